"""Coefficient learning: one fp32 scale per selected head, every model weight frozen.

The selected heads (top K by discovery score Δπ) get a coefficient α, initialised to 1 and
applied through `HeadScaling` hooks. Only α is trained: AdamW (lr 5e-3, no weight decay), a
linear schedule with a short warm-up, a fresh seeded proxy batch every step (N sequences of
n = 50 random tokens, repeated), loss = cross-entropy of the second copy. These are the
paper's settings; its released checkpoint was taken after 60 optimiser steps of 20
sequences, hence ``steps=60, batch=20``.

Coefficient range (``bounds``), enforced by projection after every optimiser step:

* ``none``: unbounded. Measured on SmolLM2-135M at lr 2e-2, several α went negative: the
  head was *flipped*, not weakened, and downstream QA did not improve.
* ``nonneg``: [0, ∞). The default, provisionally: it rules out flips, keeps the option of
  amplifying a head. Which range transfers best to multi-document QA is decided with the
  evaluation harness (`pear eval`, base vs each range on the same examples, paired test);
  the decision and its evidence go in the project's FINDINGS and this default follows it.
* ``unit``: [0, 1]: heads can only be weakened, as the paper intends ("suppression heads").

K: `choose_k` picks it from the discovery scores (the knee of the sorted positive Δπ);
see its docstring for why not a grid of fits.

Reproducibility and resume: the training batch of step s is a pure function of
``(seed, s)`` and the held-out batch of ``seed`` (a different stream), so a checkpoint
needs only the step, α, the optimiser and scheduler states and the losses so far. With a
checkpoint path, fit writes one atomically every ``checkpoint_every`` steps, on Ctrl-C and
at the end; running the same fit again resumes from it and gives the same α as an
uninterrupted run. A checkpoint from a different fit (other heads, lr, seed, ...) is an
error unless ``restart=True`` (``--restart``).

Memory (7B on one 80 GB GPU): weights in bf16 take ~14 GB; activations for 20 x 101 tokens
are a few GB. ``micro_batch`` splits each batch with gradient accumulation (same gradient),
``grad_checkpointing`` recomputes layer activations in the backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import distributed  # data-parallel
from .atomic import open_atomic, write_text
from .errors import PearError
from .proxy import ProxyBatch, make_model_batch
from .scaling import HeadKey, HeadScaling, coefficients_json
from .families import resolve

BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None), "nonneg": (0.0, None), "unit": (0.0, 1.0)}
DEFAULT_BOUNDS = "nonneg"  # provisional, see the module docstring
K_AUTO_RANGE = (4, 32)
# Parameterisations: which heads get a scale, and how fine it is (all folded into the output projection).
SCALES = {
    "heads": "one scale per top-K head (the paper)",
    "all-heads": "one scale per head, every head, pulled towards 1 by --penalty",
    "channels": "one scale per channel of every head (head x head_dim), pulled towards 1 by --penalty",
}


# ---------------------------------------------------------------------------- settings
@dataclass
class FitSettings:
    """Everything that decides the learned coefficients (and a few things that do not)."""

    steps: int = 60  # optimiser steps (the paper's released checkpoint: step 60)
    batch: int = 20  # proxy sequences per step
    length: int = 50  # n: tokens per copy (sequence = [BOS] x1..xn x1..xn)
    lr: float = 5e-3
    warmup: int | None = None  # linear warm-up steps; None: 10 % of steps, at least 1
    weight_decay: float = 0.0  # AdamW decay would pull every α towards 0, i.e. bias the fit
    bounds: str = DEFAULT_BOUNDS
    seed: int = 0
    eval_batch: int = 20  # held-out proxy sequences for before/after metrics
    objective: str = "copy"  # what the scales learn (`pear.objectives`)
    objective_options: dict = field(default_factory=dict)  # KEY=VALUE options of the objective
    scales: str = "heads"  # parameterisation (SCALES)
    penalty: float = 0.0  # weight of mean((alpha - 1)^2) added to the loss
    # below: do not change the result (beyond rounding), may differ between resumed runs
    micro_batch: int | None = None  # sequences per forward pass; None: see `default_micro_batch`
    grad_checkpointing: bool = False
    checkpoint_every: int = 10

    RESULT_FIELDS = ("steps", "batch", "length", "lr", "warmup", "weight_decay", "bounds", "seed", "eval_batch",
                     "objective", "objective_options", "scales", "penalty")

    def __post_init__(self):
        if self.bounds not in BOUNDS:
            raise PearError(f"unknown bounds '{self.bounds}'; use one of {', '.join(BOUNDS)}")
        for name in ("steps", "batch", "eval_batch", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise PearError(f"fit setting {name} must be >= 1, got {getattr(self, name)}")
        if self.length < 2:
            raise PearError(f"proxy length must be >= 2, got {self.length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PearError(f"learning rate must be a positive number, got {self.lr}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise PearError(f"micro batch must be >= 1, got {self.micro_batch}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise PearError(f"warm-up steps must be in 0..{self.steps}, got {self.warmup}")
        if self.scales not in SCALES:
            raise PearError(f"unknown scales '{self.scales}'; use one of {', '.join(SCALES)}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise PearError(f"penalty must be a number >= 0, got {self.penalty}")
        obj = self.make_objective()  # unknown objective or option: fail now, before any model work
        # options as the objective reads them (the command line gives strings): one fingerprint per fit
        self.objective_options = {k: obj.options[k] for k in self.objective_options}

    def make_objective(self, data_dir=None):
        """The objective these settings train (the copy proxy's n is `length`)."""
        from .objectives import get_objective

        opts = dict(self.objective_options)
        if self.objective == "copy":
            opts.setdefault("length", self.length)
        return get_objective(self.objective, opts, data_dir)

    @property
    def channels(self) -> bool:
        return self.scales == "channels"

    @property
    def all_heads(self) -> bool:
        return self.scales != "heads"

    @property
    def warmup_steps(self) -> int:
        return max(1, round(0.1 * self.steps)) if self.warmup is None else int(self.warmup)

    def as_dict(self) -> dict:
        """The fields, with `warmup` resolved to a number of steps."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "warmup": self.warmup_steps}

    def result_key(self) -> dict:
        return {k: getattr(self, k) for k in self.RESULT_FIELDS} | {"warmup": self.warmup_steps}


def train_seed(seed: int, step: int) -> int:
    """Seed of the training batch at `step`: independent streams per (seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0]).generate_state(1)[0])


def heldout_seed(seed: int) -> int:
    """Seed of the fixed held-out batch: a stream no training step uses (tag 1)."""
    return int(np.random.SeedSequence([seed, 0, 1]).generate_state(1)[0])


# ---------------------------------------------------------------------------- choosing heads
def ranking(source) -> list[tuple[HeadKey, float]]:
    """All heads with a discovery score, best first.

    `source`: a `DiscoveryResult` (or anything with a (layers, heads) `scores` tensor), a
    path to heads.json, or a mapping {(layer, head): score}.
    """
    if isinstance(source, (str, os.PathLike)):
        from .discover import read_heads

        source = read_heads(source)
    if hasattr(source, "ranking") and hasattr(source, "scores"):  # discovery's own order (exact scores first)
        s = torch.as_tensor(source.scores).float()  # (L, H)
        out = [(tuple(k), float(s[k])) for k in source.ranking()]
        return [(k, v) for k, v in out if math.isfinite(v)]
    if hasattr(source, "scores"):
        s = torch.as_tensor(source.scores).float()  # (L, H)
        items = {(l, h): float(s[l, h]) for l in range(s.shape[0]) for h in range(s.shape[1])}
    elif isinstance(source, Mapping):
        items = {tuple(k): float(v) for k, v in source.items()}
    else:
        raise PearError("heads must come from a discovery result, a heads.json file or {(layer, head): score}")
    items = {k: v for k, v in items.items() if math.isfinite(v)}
    return sorted(items.items(), key=lambda kv: (-kv[1], kv[0]))


def choose_k(scores: Sequence[float], lo: int = K_AUTO_RANGE[0], hi: int = K_AUTO_RANGE[1]) -> tuple[int, dict]:
    """K from the data: the knee (Kneedle) of the sorted positive Δπ, clamped to [lo, hi].

    Why the knee: Δπ > 0 means ablating the head *raises* copying, and on real models a
    few heads stand out (SmolLM2-135M: +25.6 %, +11.5 %, +9.2 %, ...) above a long tail of
    small positive values that are mostly noise. The knee is where the sorted curve stops
    falling steeply: normalise rank and score to [0, 1] and take the point farthest below
    the straight line from the first to the last positive score (Satopää et al. 2011).

    Why not a grid of fits scored by held-out proxy loss: more coefficients always fit the
    proxy better (measured: K = 5, 10, 20 -> 2.22, 1.98, 1.82), so the grid would pick its
    largest K while the proxy is not the goal, and it costs one fit per grid point.

    Clamped to [lo, hi] (never more than the number of positive heads): fewer than 4
    heads leaves little to learn, and K above 32 is far past the stand-out heads on every
    model we measured. Returns (K, evidence for the output files).
    """
    pos = sorted((float(s) for s in scores if s > 0), reverse=True)
    if not pos:
        raise PearError("no head's ablation raises copying (all Δπ <= 0): nothing to re-weight; pass --k K to force")
    m = len(pos)
    if m <= 2:
        knee = m
        dist = [0.0] * m
    else:
        y = np.asarray(pos)
        y = (y - y[-1]) / max(y[0] - y[-1], 1e-12)  # 1 .. 0
        x = np.arange(m) / (m - 1)  # 0 .. 1
        d = (1.0 - x) - y  # how far below the chord from (0, 1) to (1, 0)
        knee = int(d.argmax()) + 1
        dist = d.tolist()
    k = max(min(knee, hi), lo)
    k = min(k, m)
    return k, {
        "method": "knee of sorted positive scores (Kneedle), clamped",
        "clamp": [lo, hi], "positive_heads": m, "knee": knee, "k": k,
        "sorted_positive_scores": [round(v, 6) for v in pos[:64]],
        "distance_below_chord": [round(v, 4) for v in dist[:64]],
    }


def select_heads(source, k: int | str = "auto") -> tuple[list[HeadKey], dict[HeadKey, float], dict]:
    """Top-K heads by score. k: an int or "auto" (`choose_k`). Returns heads, their scores, evidence."""
    ranked = ranking(source)
    if not ranked:
        raise PearError("no head scores to select from")
    if k == "auto":
        k_val, evidence = choose_k([s for _, s in ranked])
    else:
        k_val = int(k)
        if not 1 <= k_val <= len(ranked):
            raise PearError(f"--k must be in 1..{len(ranked)} (heads with scores), got {k}")
        evidence = {"method": "given", "k": k_val}
    chosen = ranked[:k_val]
    return [h for h, _ in chosen], dict(chosen), evidence


def all_heads(model) -> list[HeadKey]:
    """Every (layer, head) of the model: the heads of the all-heads and channels parameterisations."""
    arch = resolve(model)
    return [(l, h) for l in range(arch.n_layers) for h in range(arch.n_heads)]


def parse_k(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise PearError(f"--k must be 'auto' or a positive integer, got '{text}'") from None
    if k < 1:
        raise PearError(f"--k must be >= 1, got {k}")
    return k


# ---------------------------------------------------------------------------- proxy metrics
def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def scored_logits(model, batch: ProxyBatch) -> torch.Tensor:
    """Logits at the scored positions only. (N, n-1, V)

    The LM head is a large share of a small model's compute; scored positions are under
    half the sequence, so only those go through it (`logits_to_keep` with indices).
    """
    pos = batch.pred_positions  # contiguous: x1..x(n-1) of the second copy
    if _supports_logits_to_keep(model):
        # an int (keep the last T - pos[0] positions), not an index tensor: accelerate's
        # device_map hooks move tensor arguments to the first GPU, the hidden states live on the last
        keep = batch.input_ids.shape[1] - int(pos[0])
        # hidden[:, -keep:] is not contiguous; when it requires grad, torch.matmul then does not
        # fold it into one matrix product but broadcasts the LM head weight over the batch (a
        # batch x vocab x d copy: ~40 % of a training step on SmolLM2). Make it contiguous first.
        head = model.get_output_embeddings()
        handle = None if head is None else head.register_forward_pre_hook(
            lambda m, args: (args[0].contiguous(), *args[1:]))
        try:
            return model(batch.input_ids, use_cache=False, logits_to_keep=keep).logits[:, : len(pos)]
        finally:
            if handle is not None:
                handle.remove()
    return model(batch.input_ids, use_cache=False).logits[:, pos]


def _nll(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """Per-position cross-entropy in fp32. (N, n-1, V) -> (N, n-1)"""
    lp = logits.float().log_softmax(-1)
    return -lp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


CPU_TOKENS_PER_FORWARD = 1024
GPU_TOKENS_PER_FORWARD = 8192


def default_micro_batch(model, length: int, tokens: int | None = None) -> int | None:
    """Sequences per forward pass when none is given: on CPU about 1,000 tokens (10 sequences
    at n = 50), which keeps activations in cache: a training step of 20 sequences on
    SmolLM2-135M (bf16, 2 cores) takes ~15 % less time as 2 x 10 than as 1 x 20. On GPUs the
    whole copy-proxy batch; long sequences (`tokens` each) in micro-batches of ~8k tokens,
    which bounds the activations kept for the backward pass. Same gradient either way
    (accumulated, weighted by micro-batch size)."""
    per_seq = tokens or (2 * length + 1)
    if next(model.parameters()).device.type != "cpu":
        return None if tokens is None else max(1, GPU_TOKENS_PER_FORWARD // per_seq)
    return max(1, CPU_TOKENS_PER_FORWARD // per_seq)


@contextlib.contextmanager
def cpu_attention(model):
    """On CPU, run the fit with transformers' eager attention instead of SDPA, then switch back.

    Proxy sequences are short (2n + 1 = 101 tokens), and for them PyTorch's CPU flash-attention
    backward is slow: on SmolLM2-135M (bf16, 2 cores, 20 sequences) a training step took 3.54 s
    with SDPA and 2.73 s with eager attention (median of 5 interleaved steps; same loss and
    gradient to bf16 rounding). GPUs, other implementations, and models that cannot switch
    are left as they are."""
    impl = getattr(model.config, "_attn_implementation", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    switched = False
    if on_cpu and impl == "sdpa":
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


def _chunks(batch: ProxyBatch, micro: int | None) -> list[ProxyBatch]:
    ids = batch.input_ids
    size = micro or len(ids)
    return [ProxyBatch(c, batch.n, batch.offset) for c in ids.split(size)]


@torch.no_grad()
def proxy_metrics(model, batch: ProxyBatch, micro_batch: int | None = None) -> dict[str, float]:
    """Held-out proxy loss (cross-entropy, second copy) and copy accuracy (argmax)."""
    micro_batch = micro_batch or default_micro_batch(model, batch.n)
    nll, correct, count = 0.0, 0.0, 0
    for b in _chunks(batch, micro_batch):
        logits = scored_logits(model, b)
        nll += float(_nll(logits, b).sum())
        correct += float((logits.argmax(-1) == b.targets).sum())
        count += b.targets.numel()
    return {"proxy_loss": nll / count, "copy_accuracy": correct / count}


def heldout_batch(model, tokenizer, settings: FitSettings) -> ProxyBatch:
    return make_model_batch(model, tokenizer, settings.eval_batch, settings.length, seed=heldout_seed(settings.seed))


# ---------------------------------------------------------------------------- result
@dataclass
class FitResult:
    heads: list[HeadKey]
    coefficients: dict[HeadKey, float]
    losses: list[float]  # training loss per completed step
    before: dict[str, float]  # held-out proxy loss / copy accuracy, base model
    after: dict[str, float] | None  # same batch, learned coefficients (None until finished)
    settings: FitSettings
    step: int  # completed optimiser steps
    seconds: float  # training time over all (resumed) runs
    resumed_from: int = 0
    model: str | None = None
    dtype: str = ""
    scores: dict[HeadKey, float] = field(default_factory=dict)  # discovery Δπ of the chosen heads
    k_selection: dict | None = None

    @property
    def finished(self) -> bool:
        return self.step >= self.settings.steps

    def to_json(self) -> dict:
        cj = coefficients_json(self.coefficients)
        rows = cj["heads"]
        for r in rows:
            key = (r["layer"], r["head"])
            r["score"] = self.scores.get(key)
            r["rank"] = self.heads.index(key) + 1
        return {"granularity": cj["granularity"], "heads": rows, "model": self.model, "fit": {
            "settings": self.settings.as_dict(), "dtype": self.dtype, "steps_done": self.step,
            "seconds": round(self.seconds, 2), "resumed_from_step": self.resumed_from,
            "before": self.before, "after": self.after, "losses": [round(v, 5) for v in self.losses],
            "k_selection": self.k_selection, "heads_order": [list(h) for h in self.heads]}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_path_for(out: str | Path) -> Path:
    """Where `pear fit --out X` keeps its resume checkpoint: X.ckpt beside X."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _fingerprint(model_spec, heads, settings: FitSettings, dtype: str) -> dict:
    return {"model": model_spec, "heads": [list(h) for h in heads], "dtype": dtype, **settings.result_key()}


def _save_ckpt(path: Path, state: dict) -> None:
    with open_atomic(path, "wb") as f:
        torch.save(state, f)


def _load_ckpt(path: Path, key: dict, restart: bool) -> dict | None:
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


# ---------------------------------------------------------------------------- training
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


def _project(alpha: torch.Tensor, bounds: str) -> None:
    lo, hi = BOUNDS[bounds]
    if lo is not None or hi is not None:
        alpha.data.clamp_(min=lo, max=hi)


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def fit(model, tokenizer, heads: Iterable[HeadKey], settings: FitSettings | None = None, *,
        checkpoint: str | Path | None = None, restart: bool = False, max_steps_this_run: int | None = None,
        progress: bool = True, model_spec: str | None = None, scores: Mapping[HeadKey, float] | None = None,
        k_selection: dict | None = None, data_dir=None, **overrides) -> FitResult:
    """Learn one coefficient per head in `heads` on the proxy task; the model is not changed.

    settings / overrides: `FitSettings` (e.g. ``fit(m, tok, heads, steps=30, lr=1e-2)``).
    checkpoint: file to save/resume training state (None: no checkpoint).
    max_steps_this_run: stop after this many steps in this call (checkpoint saved); the
    result then has ``finished == False`` and ``after is None``.
    data_dir: the data folder for objectives that read one (default $PEAR_DATA).
    Raises PearError if the loss or a coefficient becomes non-finite.
    """
    settings = dataclasses.replace(settings or FitSettings(), **overrides)
    distributed.init()  # data-parallel under torchrun / accelerate launch
    objective = settings.make_objective(data_dir)
    objective.check_data()
    if settings.micro_batch is None and settings.objective == "copy":
        settings = dataclasses.replace(settings, micro_batch=default_micro_batch(model, settings.length))
    from transformers import get_linear_schedule_with_warmup

    arch = resolve(model)
    heads = list(dict.fromkeys((int(l), int(h)) for l, h in heads))  # rank order, no duplicates
    for l, h in heads:
        arch.check_head(l, h)
    if not heads:
        raise PearError("no heads to fit")
    dtype = _dtype_name(model)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    key = _fingerprint(model_spec, heads, settings, dtype)
    state = _load_ckpt(ckpt_path, key, restart) if ckpt_path else None

    t0 = time.perf_counter()
    heldout = heldout_batch(model, tokenizer, settings)
    held_obj = None if settings.objective == "copy" else objective.batch(
        model, tokenizer, settings.eval_batch, heldout_seed(settings.seed))

    def metrics(hs) -> dict[str, float]:
        m = proxy_metrics(model, heldout, settings.micro_batch if settings.objective == "copy" else None)
        if held_obj is not None:
            with torch.no_grad():
                m["objective_loss"] = sum(float(objective.loss(model, b, hs)) * len(b) for b in
                                          objective.split(held_obj, _micro(model, settings, held_obj))) / len(held_obj)
        return m

    with frozen(model), cpu_attention(model), HeadScaling(model, heads, channels=settings.channels) as hs:
        alpha = hs.alpha
        opt = torch.optim.AdamW([alpha], lr=settings.lr, weight_decay=settings.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
        if state is None:
            with hs.disabled():  # base model, no hooks
                before = metrics(hs)
            step, losses, seconds_before, resumed_from = 0, [], 0.0, 0
        else:
            with torch.no_grad():
                alpha.copy_(state["alpha"].to(alpha.device))
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, losses, before = int(state["step"]), list(state["losses"]), dict(state["before"])
            seconds_before, resumed_from = float(state["seconds"]), int(state["step"])
            if progress:
                print(f"pear: resuming fit from {ckpt_path} at step {step}/{settings.steps}", file=sys.stderr)

        def snapshot() -> dict:
            return {"format": "pear-fit-checkpoint-1", "key": key, "step": step,
                    "alpha": alpha.detach().cpu().clone(), "optimizer": _clone(opt.state_dict()),
                    "scheduler": sched.state_dict(), "losses": list(losses), "before": before,
                    "seconds": seconds_before + time.perf_counter() - t0}

        good = snapshot()
        stop_at = settings.steps if max_steps_this_run is None else min(settings.steps, step + max_steps_this_run)
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc="fit", unit="step",
                   disable=not progress or not distributed.is_main(),  # data-parallel: rank 0 reports
                   dynamic_ncols=True)
        try:
            with grad_checkpointing(model, settings.grad_checkpointing):
                while step < stop_at:
                    loss = _train_step(model, tokenizer, settings, objective, step, hs)
                    if not math.isfinite(loss):
                        raise PearError(f"fit stopped at step {step + 1}: training loss is {loss} "
                                        f"(lr {settings.lr:g}, bounds {settings.bounds}); lower --lr or use "
                                        "--bounds unit" + _ckpt_note(ckpt_path))
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    _project(alpha, settings.bounds)
                    if not torch.isfinite(alpha).all():
                        bad = [f"L{l}H{h}" for (l, h), a in zip(hs.heads, alpha.tolist()) if not math.isfinite(a)]
                        raise PearError(f"fit stopped at step {step + 1}: coefficient(s) {', '.join(bad)} "
                                        f"became non-finite (lr {settings.lr:g}); lower --lr" + _ckpt_note(ckpt_path))
                    step += 1
                    losses.append(loss)
                    good = snapshot()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", alpha=f"[{float(alpha.detach().min()):.2f}, "
                                    f"{float(alpha.detach().max()):.2f}]")
                    if ckpt_path and distributed.is_main() and (  # data-parallel: rank 0 saves
                            step % settings.checkpoint_every == 0 or step == stop_at):
                        _save_ckpt(ckpt_path, good)
        except KeyboardInterrupt:
            if ckpt_path:
                _save_ckpt(ckpt_path, good)
                print(f"\npear: fit interrupted after step {good['step']}/{settings.steps}; checkpoint saved to "
                      f"{ckpt_path}; run the same command again to resume", file=sys.stderr)
            raise
        finally:
            bar.close()
        seconds = seconds_before + time.perf_counter() - t0
        after = metrics(hs) if step >= settings.steps else None
        coefs = hs.coefficients()
    scores = dict(scores or {})
    return FitResult(heads=heads, coefficients=coefs, losses=losses, before=before, after=after,
                     settings=settings, step=step, seconds=seconds, resumed_from=resumed_from, model=model_spec,
                     dtype=dtype, scores={h: scores[h] for h in heads if h in scores}, k_selection=k_selection)


def _ckpt_note(path: Path | None) -> str:
    return f"; checkpoint {path} kept (pass --restart to start over)" if path and path.exists() else ""


def _clone(obj):
    """Deep copy of an optimiser state dict (tensors cloned), so later steps do not change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _micro(model, settings: FitSettings, batch) -> int | None:
    """Sequences per forward pass for this batch (see `default_micro_batch`)."""
    if settings.micro_batch is not None or settings.objective == "copy":
        return settings.micro_batch
    if len({len(s.ids) for s in batch}) > 1:
        # no padding: a padded row's masked positions can carry NaN activations through the
        # hooks, and NaN x 0 gradient is NaN in alpha.grad; one sequence per pass is exact
        return 1
    longest = max(len(s.ids) + len(s.teacher_ids or ()) for s in batch)
    return default_micro_batch(model, settings.length, tokens=longest)


def _train_step(model, tokenizer, settings: FitSettings, objective, step: int, hs: HeadScaling) -> float:
    """Forward + backward on the fresh batch of `step`; leaves the gradient in `hs.alpha.grad`.
    The loss is the objective's mean over the batch, plus ``penalty * mean((alpha - 1)^2)``."""
    batch = objective.batch(model, tokenizer, settings.batch, train_seed(settings.seed, step))
    total = 0.0
    micro = distributed.split_rows(_micro(model, settings, batch), len(batch))  # data-parallel: rows for each rank
    chunks = objective.split(batch, micro)
    for b in distributed.shard(chunks):  # data-parallel: this rank's share of the batch
        loss = objective.loss(model, b, hs) * (len(b) / settings.batch)
        loss.backward()
        total += float(loss.detach())
    if settings.penalty and distributed.is_main():  # data-parallel: the penalty counted once
        reg = settings.penalty * (hs.alpha - 1).pow(2).mean()
        reg.backward()
        total += float(reg.detach())
    total = distributed.sum_grads_(hs.alpha, total)  # data-parallel: the whole batch's gradient and loss
    leaked = [n for n, p in model.named_parameters() if p.grad is not None]
    if leaked:  # the model must stay frozen: only alpha learns
        raise RuntimeError(f"model parameters received gradients: {leaked[:3]}")
    return total


# ---------------------------------------------------------------------------- CLI
def add_fit_args(p: argparse.ArgumentParser) -> None:
    """Fit options shared by `pear fit` and `pear run`. Options left out take the recipe's
    value (`pear.recipes`), then FitSettings' default."""
    from .recipes import DEFAULT_RECIPE, RECIPES

    d = FitSettings()
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help=f"named fit settings (default {DEFAULT_RECIPE}): "
                   + "; ".join(f"{k}: {r.description}" for k, r in RECIPES.items()))
    p.add_argument("--k", default=None, help="number of heads: an integer, or auto (knee of the sorted "
                   "positive discovery scores, clamped to 4..32; default)")
    p.add_argument("--bounds", default=None, choices=list(BOUNDS),
                   help="coefficient range: none (unbounded), nonneg [0, inf) (default, provisional), unit [0, 1]")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=None, help=f"proxy sequences per step (default {d.batch})")
    p.add_argument("--length", type=int, default=None, help=f"tokens per copy, n (default {d.length})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 10%% of steps)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help=f"held-out proxy sequences for before/after metrics (default {d.eval_batch})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward pass, gradients accumulated (default: whole batch on GPU, "
                   "~1000 tokens on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations (large models)")
    p.add_argument("--objective", default=None, choices=list(_objective_names()),
                   help="what the scales learn: copy (the paper's proxy), long-copy, retrieval, "
                   "position-distill (see pear.objectives)")
    p.add_argument("--objective-option", dest="objective_options", action="append", default=None,
                   metavar="KEY=VALUE", help="an option of the objective, e.g. documents=20 (repeatable)")
    p.add_argument("--scales", default=None, choices=list(SCALES),
                   help="parameterisation: " + "; ".join(f"{k}: {v}" for k, v in SCALES.items()))
    p.add_argument("--penalty", type=float, default=None,
                   help="weight of mean((alpha - 1)^2) in the loss (default 0)")
    p.add_argument("--data-dir", default=None,
                   help="data folder for objectives that read one (SQuAD 2.0; default $PEAR_DATA)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--restart", action="store_true", help="discard a checkpoint from an earlier, different fit")


def _objective_names():
    from .objectives import OBJECTIVES

    return OBJECTIVES


FIT_ARGS = ("steps", "batch", "length", "lr", "warmup", "bounds", "seed", "eval_batch", "micro_batch",
            "grad_checkpointing", "objective", "scales", "penalty")


def settings_from_args(args: argparse.Namespace) -> FitSettings:
    """The recipe's settings, with every option given on the command line on top."""
    from .objectives import parse_options
    from .recipes import get_recipe

    values = dict(get_recipe(args.recipe).fit)
    if args.objective is not None and args.objective != values.get("objective"):
        values.pop("objective_options", None)  # the recipe's options belong to its own objective
    values.update({k: getattr(args, k) for k in FIT_ARGS if getattr(args, k, None) is not None})
    if args.objective_options is not None:
        values["objective_options"] = parse_options(args.objective_options)
    return FitSettings(**values)


def k_from_args(args: argparse.Namespace) -> int | str:
    from .recipes import get_recipe

    return parse_k(args.k if args.k is not None else get_recipe(args.recipe).k)


def compute_dtype(dtype: str, device: str = "auto") -> str:
    """auto -> what the hardware computes fastest (`pear.hardware.choose`: bf16 on GPUs and on
    CPUs with native bf16, else fp32); α and the loss stay fp32."""
    from .hardware import choose

    return choose(device, dtype, threads=False).dtype if dtype in (None, "auto") else dtype


def add_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("fit", help="learn one coefficient per selected head on the proxy task",
                       description="Learn a scale for each of the top-K discovered heads with every model "
                       "weight frozen; write coefficients.json (for `pear fold`). Interrupted fits resume "
                       "when the same command is run again.")
    add_model_args(p)
    p.add_argument("--heads", default=None, metavar="heads.json",
                   help="output of `pear discover` (needed with --scales heads, the default)")
    p.add_argument("--out", required=True, metavar="coefficients.json")
    add_fit_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop after this many steps (checkpoint kept; run again to continue)")
    p.set_defaults(func=_cli_fit)


def _cli_fit(args: argparse.Namespace) -> int:
    from .hardware import announce
    from .loading import load_model
    from .preflight import check_heads, check_out_file

    check_out_file(args.out, args.force, example="coefficients.json")
    settings = settings_from_args(args)
    if args.max_steps_this_run is not None and args.max_steps_this_run < 1:
        raise PearError(f"--max-steps-this-run must be >= 1, got {args.max_steps_this_run}")
    settings.make_objective(args.data_dir).check_data()
    k = k_from_args(args)
    if settings.all_heads:
        heads, scores, evidence = None, {}, {"method": f"every head ({settings.scales})"}
    elif args.heads is None:
        raise PearError("--heads heads.json is needed with --scales heads (or use --scales all-heads/channels)")
    else:
        heads, scores, evidence = select_heads(args.heads, k)
        check_heads(args.model, heads)
    choice = announce(args.device, args.dtype)
    loaded = load_model(args.model, dtype=choice.dtype, device=args.device, device_map=args.device_map)
    heads = heads or all_heads(loaded.model)
    ckpt = checkpoint_path_for(args.out)
    res = fit(loaded.model, loaded.tokenizer, heads, settings, checkpoint=ckpt, restart=args.restart,
              max_steps_this_run=args.max_steps_this_run, model_spec=loaded.spec.spec, scores=scores,
              k_selection=evidence, data_dir=args.data_dir)
    if not distributed.is_main():  # data-parallel: rank 0 saves
        return 0
    if not res.finished:
        print(f"pear: stopped after step {res.step}/{settings.steps} as asked; checkpoint {ckpt}; "
              "run the same command again to continue", file=sys.stderr)
        return 0
    res.save(args.out)
    ckpt.unlink(missing_ok=True)
    b, a = res.before, res.after
    print(f"fitted {len(heads)} heads in {res.seconds:.1f} s: held-out proxy loss {b['proxy_loss']:.3f} -> "
          f"{a['proxy_loss']:.3f}, copy accuracy {b['copy_accuracy']:.3f} -> {a['copy_accuracy']:.3f}; "
          f"coefficients in [{float(torch.tensor(list(res.coefficients.values())).min()):.3f}, "
          f"{float(torch.tensor(list(res.coefficients.values())).max()):.3f}]; "
          f"saved {args.out}")
    return 0
