"""pear: Position-Embedding-Agnostic Attention Re-weighting (arXiv 2409.19745).

Pipeline: proxy -> discover -> fit -> fold -> evaluate. The result is an ordinary
checkpoint: same architecture, same speed, same memory as the base model.
"""

__version__ = "0.1.0"

from .errors import PearError  # noqa: E402
from .families import Arch, resolve  # noqa: E402
from .loading import LoadedModel, load_model  # noqa: E402
from .scaling import HeadScaling, fold, read_coefficients, unfold  # noqa: E402
from .checkpoint import fold_and_save, save_checkpoint, verify_fold  # noqa: E402
from .pipeline import RunResult, run  # noqa: E402

__all__ = [
    "PearError", "Arch", "resolve", "LoadedModel", "load_model", "HeadScaling", "fold", "unfold",
    "read_coefficients", "fold_and_save", "save_checkpoint", "verify_fold",
    "run", "RunResult",
]
