"""Which PyTorch attention kernels pear's own loops use, and why.

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
