"""pear: Position-Embedding-Agnostic Attention Re-weighting (arXiv 2409.19745).

Pipeline: proxy -> discover -> fit -> fold -> evaluate. The result is an ordinary
checkpoint: same architecture, same speed, same memory as the base model.
"""

__version__ = "0.1.0"

from .errors import PearError  # noqa: E402

# The rest loads on first use (PEP 562): `import pear` and `pear --help` stay fast (no torch).
_LAZY = {
    "Arch": "families", "resolve": "families", "LoadedModel": "loading", "load_model": "loading",
    "HeadScaling": "folding", "fold": "folding", "read_coefficients": "folding", "unfold": "folding",
    "fold_and_save": "folding", "save_checkpoint": "folding", "verify_fold": "folding",
    "RunResult": "pipeline", "run": "pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pear' has no attribute {name!r}")


__all__ = [
    "PearError", "Arch", "resolve", "LoadedModel", "load_model", "HeadScaling", "fold", "unfold",
    "read_coefficients", "fold_and_save", "save_checkpoint", "verify_fold",
    "run", "RunResult",
]
