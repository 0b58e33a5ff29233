"""One dtype policy for every command, and one way to name a dtype.

``--dtype auto`` has two meanings, and each command says which one it uses (`AUTO_MEANING`):

* compute (discover, fit, run, eval, bench): what the hardware computes fastest
  (`pear.hardware.choose`: bf16 on GPUs and on CPUs with native bf16, fp32 on CPUs without it,
  where emulated bf16 is several times slower). Probabilities, losses and coefficients stay fp32.
* checkpoint (fold, inspect, and ``pear run --save-dtype``): the checkpoint's own dtype, so
  that folding adds no rounding beyond what the base model already has. A GGUF file is
  dequantised to fp32 (`GGUF_DTYPE`), its faithful copy.

Names in files (pear.json, coefficients.json, report.md) are torch's without the prefix:
``dtype_name(torch.bfloat16) == "bfloat16"``.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
GGUF_DTYPE = torch.float32  # what a GGUF file's weights are dequantised to
AUTO_MEANING = {
    "compute": "what this hardware computes fastest (bf16 on GPUs and on CPUs with native bf16, else fp32)",
    "checkpoint": "the checkpoint's own dtype (fp32 for a GGUF file)",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype for "fp32"/"bf16"/"fp16" (or their torch names), "auto" for auto/None."""
    from .errors import PearError

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PearError(f"unknown dtype '{dtype}'; use one of auto, fp32, bf16, fp16")
    return DTYPES[dtype]


def dtype_name(x) -> str:
    """"bfloat16", "float32", ...: of a dtype, a tensor, or a model (its first parameter)."""
    if isinstance(x, torch.nn.Module):
        x = next(x.parameters())
    if isinstance(x, torch.Tensor):
        x = x.dtype
    return str(x).replace("torch.", "")


def compute_dtype(dtype: str | None, device: str = "auto") -> str:
    """``--dtype`` for computing: auto -> what the hardware computes fastest; else as given."""
    from .hardware import choose

    return choose(device, dtype, threads=False).dtype if dtype in (None, "auto") else dtype


def checkpoint_dtype(spec) -> torch.dtype:
    """The dtype `load_model(spec, dtype="auto")` gives: fp32 for GGUF, else the config's dtype."""
    from .loading import resolve_spec

    ms = resolve_spec(spec)
    if ms.gguf_file:
        return GGUF_DTYPE
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ms.path)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return DTYPES.get(dtype_name(d), torch.float32)
