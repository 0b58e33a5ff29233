"""What the fit's training loop runs inside: a frozen model, eager attention on CPU,
gradient checkpointing, and the resume checkpoint.

Each piece is a context manager or a small function, so `pear.fit.fit` reads as the
algorithm alone; `pear.estimate` times a step inside the same contexts.

Resume checkpoint: the training batch of step s is a pure function of ``(seed, s)``, so a
checkpoint holds only the step, α, the optimiser and scheduler states, the losses so far
and a fingerprint of the fit (model, heads, dtype, settings). A checkpoint whose
fingerprint differs is refused rather than silently mixed into another fit.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from .atomic import open_atomic
from .errors import PearError
from .settings import FitSettings


# ---------------------------------------------------------------------------- model state
@contextlib.contextmanager
def frozen(model):
    """Freeze every model parameter for the duration; restore the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def cpu_attention(model, short: bool = True):
    """On CPU, for `short` sequences, run the fit with transformers' eager attention instead of
    SDPA, then switch back.

    Proxy sequences are short (2n + 1 = 101 tokens), and for them PyTorch's CPU flash-attention
    backward is slow: on SmolLM2-135M (bf16, 2 cores, 20 sequences) a training step took 3.54 s
    with SDPA and 2.73 s with eager attention (median of 5 interleaved steps; same loss and
    gradient to bf16 rounding). Long sequences go the other way: one retrieval sequence of
    2,779 tokens took 24 s forward and backward with SDPA and 50 s with eager attention (second
    of two interleaved runs each, same 2 busy cores), which builds the whole T x T matrix.
    GPUs, other implementations, and models that cannot switch are left as they are."""
    impl = getattr(model.config, "_attn_implementation", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    switched = False
    if short and on_cpu and impl == "sdpa":
        try:
            model.set_attn_implementation("eager")
            switched = model.config._attn_implementation == "eager"
        except (ValueError, NotImplementedError, AttributeError):
            switched = False
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(impl)


@contextlib.contextmanager
def grad_checkpointing(model, enabled: bool):
    """Recompute decoder-layer activations in the backward pass (non-reentrant, so the
    hooks and frozen inputs need no special treatment).

    Transformers only checkpoints layers whose `training` flag is set; we set that flag on
    the layers themselves but not on their children, so dropout stays off (eval mode).
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PearError(f"{type(model).__name__} does not support gradient checkpointing; use --micro-batch instead")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()  # not needed when non-reentrant; would extend backward to layer 0
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


# ---------------------------------------------------------------------------- resume checkpoint
def checkpoint_path_for(out: str | Path) -> Path:
    """Where `pear fit --out X` keeps its resume checkpoint: X.ckpt beside X."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def fingerprint(model_spec, heads, settings: FitSettings, dtype: str) -> dict:
    """What must match for a checkpoint to resume this fit."""
    return {"model": model_spec, "heads": [list(h) for h in heads], "dtype": dtype, **settings.result_key()}


def save_resume(path: Path, state: dict) -> None:
    with open_atomic(path, "wb") as f:
        torch.save(state, f)


def load_resume(path: Path, key: dict, restart: bool) -> dict | None:
    """The saved state of this fit, or None to start afresh (no file, or ``restart``)."""
    if not path.exists():
        return None
    if restart:
        path.unlink()
        print(f"pear: --restart: removed checkpoint {path}", file=sys.stderr)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old = state["key"]
    except Exception as e:  # truncated or foreign file
        raise PearError(f"cannot read fit checkpoint {path} ({type(e).__name__}); delete it or pass --restart") from None
    if old != key:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {key.get(k)!r}" for k in key if old.get(k) != key.get(k))
        raise PearError(f"checkpoint {path} is from a different fit ({diff}); "
                        "rerun with the same settings to resume, or pass --restart to start over")
    return state


def resume_note(path: Path | None) -> str:
    """The tail of a fit error: where the last good state was kept."""
    return f"; checkpoint {path} kept (pass --restart to start over)" if path and path.exists() else ""


def clone_state(obj):
    """Deep copy of an optimiser state dict (tensors cloned), so later steps do not change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    return obj
