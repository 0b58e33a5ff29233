"""`--dtype auto` and the thread count follow the hardware (pear/hardware.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pear import hardware

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEAR_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("bf16_s,expect", [(0.01, "bf16"), (0.5, "fp32"), (0.09, "fp32")])
def test_cpu_auto_is_bf16_only_where_it_is_measured_faster(cache, monkeypatch, bf16_s, expect):
    calls = []

    def fake(dtype, **kw):
        calls.append(dtype)
        return 0.1 if dtype == torch.float32 else bf16_s

    monkeypatch.setattr(hardware, "_matmul_seconds", fake)
    c = hardware.choose("cpu", "auto", threads=False)
    assert c.dtype == expect and c.threads is None
    entry = json.loads((cache / "hardware.json").read_text())[hardware.cpu_key()]
    assert entry["native_bf16"] == (expect == "bf16")
    # cached: a second choice measures nothing
    n = len(calls)
    assert hardware.choose("cpu", "auto", threads=False).dtype == expect and len(calls) == n


def test_explicit_dtype_and_pear_threads_are_kept(cache, monkeypatch):
    monkeypatch.setenv("PEAR_THREADS", "1")
    before = torch.get_num_threads()
    try:
        c = hardware.choose("cpu", "bf16")
        assert (c.dtype, c.threads) == ("bf16", 1) and torch.get_num_threads() == 1
        assert "PEAR_THREADS=1" in c.line() and c.line().startswith("pear: cpu, bf16, 1 thread")
    finally:
        torch.set_num_threads(before)
    assert not (cache / "hardware.json").exists()  # nothing measured for an explicit dtype


def test_thread_count_is_the_measured_fastest(monkeypatch):
    monkeypatch.delenv("PEAR_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    times = {1: 0.3, 2: 0.1, 4: 0.2}  # a loaded machine: two threads beat four
    monkeypatch.setattr(hardware, "_matmul_seconds", lambda dt, **kw: times[seen[-1]])
    n, why = hardware.fastest_threads()
    assert n == 2 and why == "fastest of 1, 2, 4 threads"


def test_avx2_only_cpu_gets_fp32(tmp_path):
    """A real measurement in a process limited to AVX2 (no AVX512-BF16): emulated bf16 is slower,
    so auto is fp32, and the cached entry records the capability."""
    code = "from pear.hardware import choose; print(choose('cpu', 'auto', threads=False).dtype)"
    env = dict(os.environ, PYTHONPATH=str(REPO), PEAR_CACHE=str(tmp_path), ATEN_CPU_CAPABILITY="avx2",
               ONEDNN_MAX_CPU_ISA="AVX2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.strip() == "fp32"
    (entry,) = json.loads((tmp_path / "hardware.json").read_text()).values()
    assert entry["capability"] == "AVX2" and not entry["native_bf16"] and entry["bf16_s"] > entry["fp32_s"]


def test_cpu_bf16_flags_reads_the_native_bf16_features(monkeypatch):
    """Benchmarks record these flags beside their figures: only the bf16 / AMX ones, sorted."""
    fields = {"flags": "fpu sse2 avx2 amx_tile avx512f avx512_bf16 amx_bf16 avx_vnni", "model name": "Some CPU"}
    monkeypatch.setattr(hardware, "_cpuinfo", fields.get)
    assert hardware.cpu_bf16_flags() == ["amx_bf16", "amx_tile", "avx512_bf16"]
    assert hardware.cpu_name() == "Some CPU"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda field: None)  # no /proc/cpuinfo
    assert hardware.cpu_bf16_flags() == [] and hardware.cpu_name()
