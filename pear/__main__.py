"""`python -m pear ...`: the `pear` command, also as launchers start it
(`torchrun --nproc-per-node 2 -m pear eval ...`, `accelerate launch -m pear eval ...`)."""

import sys

from .cli import main

sys.exit(main())
