"""GPU runtime choices shared by pear's own loops: which attention kernels they use, and how
they react to running out of GPU memory.

Discovery re-runs the model on many batch shapes (a different number of stacked copies per
layer) and decoding makes a new (batch, query, key) shape at every step. cuDNN's SDPA kernel
builds an execution plan for each new shape; the flash and memory-efficient kernels need none.
Measured: decoding SmolLM2 on an H200 ran 3x slower with cuDNN allowed (BENCHMARKS.md §3c); fast
discovery on the Llama-2-7B shape on an H100 took 15.0 s with cuDNN allowed and 11.7 s without
(the same heads; BENCHMARKS.md §1). On CPU the choice changes nothing: cuDNN is CUDA-only.
"""
from __future__ import annotations


def attention_backends():
    """A context manager allowing every SDPA backend but cuDNN's (flash, memory-efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def fits_in_memory(fn, *args, can_shrink: bool = True) -> tuple[bool, object]:
    """(True, fn(*args)), or (False, None) if the GPU ran out of memory and the caller can shrink
    the work (`can_shrink`; otherwise the error propagates). Callers then free what they hold,
    call ``torch.cuda.empty_cache()`` and retry smaller (discovery: fewer stacked heads; decoding:
    half the batch).

    The point of returning instead of retrying inside an ``except`` block: while that block
    runs, the exception's traceback keeps the failed attempt's frames, and with them its
    activations, alive, so the smaller retry ran out of memory too (seen on an H100)."""
    import torch

    try:
        return True, fn(*args)
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError in torch >= 2.5
        if not can_shrink:
            raise
    return False, None


def kernel_agrees(run, reference, atol: float = 2e-2) -> bool:
    """Whether `run()` (a kernel tried once on a small input) runs here and agrees with
    `reference()` within `atol`: an operator this torch lacks, or one that refuses the input's
    layout, answers False, so the caller keeps its general path instead of failing mid-evaluation."""
    import torch

    try:
        got = run()
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(got.float(), reference().float(), atol=atol, rtol=0))
