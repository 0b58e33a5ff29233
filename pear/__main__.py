"""`python -m pear ...`: the `pear` command, also as launchers start it
(`torchrun --nproc-per-node 2 -m pear eval ...`, `accelerate launch -m pear eval ...`)."""

import sys

from . import distributed
from .cli import main

rc = main()
distributed.end(rc)  # several processes: leave together, no interpreter teardown
sys.exit(rc)
