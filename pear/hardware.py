"""What `--dtype auto` and the thread count mean on this machine: one rule for every command.

bf16 halves memory traffic, but it is only fast where the hardware computes it natively:
GPUs with bf16 support, and CPUs with AVX512-BF16 / AMX. On an AVX2-only CPU PyTorch emulates
bf16 and a SmolLM2 forward pass is ~3.7x *slower* than in fp32. So on CPU the choice is
measured, not assumed: a small matmul in both dtypes, once per CPU kind (capability, model
name, torch version, ISA limits), cached in ``<pear cache>/hardware.json``.

Threads: PyTorch starts one thread per core, but on a shared machine one thread can beat two
(the second waits for a busy core). A short matmul at each candidate count picks the fastest,
measured at start-up (load changes; this is ~0.1 s). ``PEAR_THREADS`` or ``OMP_NUM_THREADS``
set by the user win.

`choose(device, dtype)` returns the decision; the CLI prints it as one line on stderr.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

BF16_GAIN = 0.8  # bf16 is chosen on CPU only if it takes under 80 % of the fp32 time


@dataclass(frozen=True)
class Choice:
    device: str
    dtype: str  # "fp32" | "bf16" | "fp16"
    threads: int | None  # None on GPU
    reason: str

    def line(self) -> str:
        t = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"pear: {self.device}, {self.dtype}{t} ({self.reason})"


def on_one_device(model) -> bool:
    """False for a model split over devices by `--device-map` (accelerate's hf_device_map)."""
    return len(set((getattr(model, "hf_device_map", None) or {0: 0}).values())) == 1


def cpu_capability() -> str:
    """PyTorch's CPU kernel level: AVX2, AVX512, DEFAULT, ... (honours ATEN_CPU_CAPABILITY)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch, exotic builds
        return "unknown"


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 and AMX feature flags (avx512_bf16, amx_bf16, ...): what native bf16 needs."""
    return sorted(f for f in (_cpuinfo("flags") or "").split() if "bf16" in f or f.startswith("amx"))


def cpu_key() -> str:
    """What the bf16 measurement depends on; a change re-measures."""
    import torch

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "") or os.environ.get("DNNL_MAX_CPU_ISA", "")
    return f"{cpu_name()}|{cpu_capability()}|isa={isa}|torch={torch.__version__}"


def _matmul_seconds(dtype, reps: int = 5, m: int = 512, k: int = 576, n: int = 1536,
                    give_up_after: float = float("inf")) -> float:
    """Best of `reps` (m, k) @ (k, n) products: the shape of a small model's MLP on a short batch.
    Stops early once one product (after the warm-up) takes longer than `give_up_after` seconds."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    a @ b  # warm-up: kernel selection, allocations
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if best > give_up_after:
            break
    return best


def _cache_file() -> Path:
    from .loading import cache_dir

    return cache_dir() / "hardware.json"


def cpu_bf16_measurement() -> dict:
    """{"fp32_s", "bf16_s", "native_bf16", "capability"}, measured once per `cpu_key()` and cached."""
    import torch

    key = cpu_key()
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict):
        return cached[key]
    fp32 = _matmul_seconds(torch.float32)
    bf16 = _matmul_seconds(torch.bfloat16, give_up_after=3 * fp32)  # emulated bf16: one product says it
    entry = {"fp32_s": fp32, "bf16_s": bf16, "native_bf16": bf16 < BF16_GAIN * fp32,
             "capability": cpu_capability(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from .atomic import write_text

        cached = cached if isinstance(cached, dict) else {}
        write_text(path, json.dumps({**cached, key: entry}, indent=2) + "\n")
    except OSError:  # an unwritable cache only costs the measurement next time
        pass
    return entry


def fastest_threads(dtype_name: str = "fp32") -> tuple[int, str]:
    """(threads, why): the user's PEAR_THREADS / OMP_NUM_THREADS, else the fastest of 1..cores."""
    import torch

    for var in ("PEAR_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) >= 1:
            return int(v), f"{var}={v}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    cores = max(1, min(cores, torch.get_num_threads()))
    if cores == 1:
        return 1, "one core"
    candidates = sorted({1, max(1, cores // 2), cores})
    dt = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    before = torch.get_num_threads()
    times = {}
    for n in candidates:
        torch.set_num_threads(n)
        times[n] = _matmul_seconds(dt, reps=3, m=256)
    torch.set_num_threads(before)
    best = min(times, key=times.get)
    return best, f"fastest of {', '.join(map(str, candidates))} threads"


def choose(device: str = "auto", dtype: str = "auto", *, threads: bool = True) -> Choice:
    """The compute dtype and thread count for `device`.

    dtype "auto": on CUDA bf16 where supported, else fp32; on CPU bf16 only where the measured
    bf16 matmul is clearly faster than fp32 (native bf16), else fp32. An explicit dtype is kept.
    With `threads`, the CPU thread count is set (`torch.set_num_threads`) to the fastest.
    """
    import torch

    from .loading import parse_device

    dev = parse_device(device)
    if dev.startswith("cuda"):
        if dtype in (None, "auto"):
            ok = torch.cuda.is_bf16_supported()
            return Choice(dev, "bf16" if ok else "fp32", None, "GPU bf16" if ok else "GPU without bf16")
        return Choice(dev, dtype, None, "as asked")
    if dtype in (None, "auto"):
        m = cpu_bf16_measurement()
        ratio = m["bf16_s"] / max(m["fp32_s"], 1e-12)
        name = "bf16" if m["native_bf16"] else "fp32"
        reason = (f"CPU {m['capability']}: bf16 matmul {ratio:.2g}x the fp32 time, "
                  f"{'native' if m['native_bf16'] else 'no native'} bf16")
    else:
        name, reason = dtype, "as asked"
    n = None
    if threads and dev == "cpu":
        n, why = fastest_threads(name)
        torch.set_num_threads(n)
        reason += f"; {why}"
    return Choice(dev, name, n, reason)


def announce(device: str = "auto", dtype: str = "auto", quiet: bool = False) -> Choice:
    """`choose`, and say what was chosen (one line on stderr)."""
    import sys

    c = choose(device, dtype)
    if not quiet:
        print(c.line(), file=sys.stderr)
    return c
