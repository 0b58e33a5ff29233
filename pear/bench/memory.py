"""Peak memory is what a process holding only that variant's model would reach: its weights and
buffers plus the extra memory the trial needed above what was allocated before it.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact).
- CPU: peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
  after returning freed heap pages to the OS (``malloc_trim``). The allocator reuses pages
  between trials, so small CPU differences are noise; use the CUDA figures for conclusions.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os

import torch


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _hwm_bytes()
        return "cpu_peak_rss"
    except OSError:
        return "none"


class PeakMemory:
    """Context manager: `.extra` = peak bytes above what was in use when it was entered."""

    def __init__(self, method: str, device: str):
        self.method, self.device, self.extra = method, device, None

    def __enter__(self):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.method == "cpu_peak_rss":
            gc.collect()
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.before = _rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.method == "cpu_peak_rss":
            self.extra = max(0, _hwm_bytes() - self.before)
