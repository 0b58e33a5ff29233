"""Shared fixtures. Real-model fixtures are session-scoped: SmolLM2 loads once per run."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Evaluation data: $PEAR_DATA, else ../shared/data beside the repository (as CI has it).
os.environ.setdefault("PEAR_DATA", str(REPO.parent / "shared" / "data"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fp32), loaded once. Tests must not leave it modified."""
    import pear

    return pear.load_model("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_fast():
    """The real default model in the dtype this CPU computes fastest (pear.hardware: bf16 where
    it is native, else fp32)."""
    import pear
    from pear.hardware import choose

    return pear.load_model("smollm2-135m", dtype=choose("cpu", "auto", threads=False).dtype, device="cpu")


@pytest.fixture(scope="session")
def smollm2_bf16():
    import pear

    return pear.load_model("smollm2-135m", dtype="bf16", device="cpu")


@pytest.fixture
def data_dir() -> Path:
    d = Path(os.environ["PEAR_DATA"])
    if not d.is_dir():
        pytest.fail(f"evaluation data folder not found: {d} (set PEAR_DATA)")
    return d


@pytest.fixture
def ctrl_c_at_step(monkeypatch):
    """ctrl_c_at_step(n): the fit's training step n raises KeyboardInterrupt (as Ctrl-C would),
    until ctrl_c_at_step(None) puts the real step back."""
    import pear.fit as F

    real = F._train_step

    def arm(n):
        def step(model, tok, settings, objective, i, hs):
            if i == n:
                raise KeyboardInterrupt
            return real(model, tok, settings, objective, i, hs)

        monkeypatch.setattr(F, "_train_step", real if n is None else step)

    return arm
