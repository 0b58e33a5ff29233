"""The position-embedding study (see `pear/study/pe.py`): three small LMs that differ only in
their position embedding (RoPE, learned absolute, ALiBi), trained here on the same data, then
`pear run` and base-vs-PEAR evaluation with the gold at several positions.

    PEAR_DATA=../shared/data python3 benchmarks/pe_study.py --out /tmp/pe_study
    python3 benchmarks/pe_study.py --out /tmp/pe_study --recipe unit --run-option bounds=unit

Results to keep: DIR/study-<recipe>.{json,md,png}, DIR/heads-<recipe>.png, DIR/train_loss.png and
DIR/eval-<recipe>-<arch>.{json,md,png}; the checkpoints (DIR/<arch>/) are not for the repository.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pear.study.pe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
