"""Coefficient learning: one fp32 scale per selected head, every model weight frozen.

The selected heads (top K by discovery score Δπ) get a coefficient α, initialised to 1 and
applied through `HeadScaling` hooks. Only α is trained: AdamW (lr 5e-3, no weight decay), a
linear schedule with a short warm-up, a fresh seeded proxy batch every step (N sequences of
n = 50 random tokens, repeated), loss = cross-entropy of the second copy. These are the
paper's settings; its released checkpoint was taken after 60 optimiser steps of 20
sequences, hence ``steps=60, batch=20``.

Coefficient range: `pear.settings.Bounds` (``--bounds``), enforced by projection after every
optimiser step.

Which heads, and how many (K): `pear.heads`, the one rule `pear discover`, `pear fit` and
`pear run` share.

Reproducibility and resume: the training batch of step s is a pure function of
``(seed, s)`` and the held-out batch of ``seed`` (a different stream), so a checkpoint
needs only the step, α, the optimiser and scheduler states and the losses so far. With a
checkpoint path, fit writes one atomically every ``checkpoint_every`` steps or
``checkpoint_seconds`` (whichever comes first: a killed CPU fit loses minutes, not ten steps),
on Ctrl-C and at the end; running the same fit again resumes from it and gives the same α as an
uninterrupted run. A checkpoint from a different fit (other heads, lr, seed, ...) is an
error unless ``restart=True`` (``--restart``). The checkpoint files, the frozen model, eager
attention on CPU and gradient checkpointing live in `pear.training`.

Memory (7B on one 80 GB GPU): weights in bf16 take ~14 GB; activations for 20 x 101 tokens
are a few GB. ``micro_batch`` splits each batch with gradient accumulation (same gradient),
``grad_checkpointing`` recomputes layer activations in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from . import distributed  # data-parallel
from .atomic import json_text, write_text
from .dtypes import dtype_name
from .errors import PearError
from .families import resolve
from .folding import HeadKey, HeadScaling, coefficients_json
from .folding.coefficients import select
from .objectives import anchor, chunks
from .proxy import (  # noqa: F401  (_nll, scored_logits: the copy objective looks them up here)
    ProxyBatch,
    _nll,
    default_micro_batch,
    make_model_batch,
    proxy_metrics,
    scored_logits,
)
from .settings import (  # noqa: F401
    BOUNDS,
    DEFAULT_BOUNDS,
    SCALES,
    Bounds,
    FitSettings,
    anchor_seed,
    heldout_seed,
    train_seed,
)
from .training import (  # noqa: F401  (checkpoint_path_for: part of pear.fit's names)
    checkpoint_path_for,
    clone_state,
    cpu_attention,
    fingerprint,
    frozen,
    grad_checkpointing,
    load_resume,
    resume_note,
    save_resume,
)


def heldout_batch(model, tokenizer, settings: FitSettings) -> ProxyBatch:
    return make_model_batch(model, tokenizer, settings.eval_batch, settings.length, seed=heldout_seed(settings.seed))


# ---------------------------------------------------------------------------- result
def metrics_text(before: dict, after: dict) -> str:
    """The held-out metrics before -> after for a summary line: the copy proxy's, which every fit
    measures, and the fit's own objective's loss and the anchor's KL where it has them."""
    text = (f"held-out proxy loss {before['proxy_loss']:.3f} -> {after['proxy_loss']:.3f}, "
            f"copy accuracy {before['copy_accuracy']:.3f} -> {after['copy_accuracy']:.3f}")
    for key, what in (("objective_loss", "objective loss"), ("anchor_kl", "anchor KL")):
        if key in before and key in after:
            text += f", {what} {before[key]:.3f} -> {after[key]:.3f}"
    return text


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
        cj = coefficients_json(self.coefficients, self.settings.site)
        rows = cj["heads"]
        for r in rows:
            key = (r["layer"], r["head"])
            r["score"] = self.scores.get(key)
            r["rank"] = self.heads.index(key) + 1
        return {"granularity": cj["granularity"], "site": cj["site"], "heads": rows, "model": self.model, "fit": {
            "settings": self.settings.as_dict(), "dtype": self.dtype, "steps_done": self.step,
            "seconds": round(self.seconds, 2), "resumed_from_step": self.resumed_from,
            "before": self.before, "after": self.after, "losses": [round(v, 5) for v in self.losses],
            "k_selection": self.k_selection, "heads_order": [list(h) for h in self.heads]}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text(path, json_text(self.to_json()) + "\n")
        return path


# ---------------------------------------------------------------------------- training
def _micro(model, settings: FitSettings, seqs) -> int | None:
    """Sequences per forward pass for these sequences (see `default_micro_batch`). Sequences of
    different lengths share a pass: `objectives.answer_logprobs` pads them without NaN."""
    if settings.micro_batch is not None or settings.objective == "copy":
        return settings.micro_batch
    longest = max(len(s) + len(getattr(s, "teacher_ids", None) or ()) for s in seqs)
    return default_micro_batch(model, settings.length, tokens=longest)


def _passes(model, settings: FitSettings, seqs, split=chunks) -> list:
    """This rank's micro-batches of `seqs` (data-parallel: the rows are split over the ranks)."""
    return distributed.shard(split(seqs, distributed.split_rows(_micro(model, settings, seqs), len(seqs))))


def _train_step(model, tokenizer, settings: FitSettings, objective, step: int, hs: HeadScaling) -> float:
    """Forward + backward on the fresh batch of `step`; leaves the gradient in `hs.alpha.grad`.
    The loss is the objective's mean over the batch, plus ``penalty * mean((alpha - 1)^2)``, plus
    ``anchor`` x the knowledge anchor's KL on `batch` fresh plain-text paragraphs (`objectives.anchor`)."""
    with hs.disabled():  # made by the base model where an objective asks it (a teacher's own answers)
        batch = objective.batch(model, tokenizer, settings.batch, train_seed(settings.seed, step))  # fresh each step
    total = 0.0
    for b in _passes(model, settings, batch, objective.split):
        loss = objective.loss(model, b, hs) * (len(b) / settings.batch)
        loss.backward()
        total += float(loss.detach())
    if settings.anchor:
        seqs = anchor.batch(tokenizer, objective.data_dir, settings.batch, anchor_seed(settings.seed, step),
                            settings.anchor_source)
        for part in _passes(model, settings, seqs):
            loss = settings.anchor * anchor.loss(model, part, hs, settings.anchor_source) * (len(part) / len(seqs))
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


# ---------------------------------------------------------------------------- the loop
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
    if settings.anchor:
        anchor.check_data(data_dir)
    if settings.micro_batch is None and settings.objective == "copy":
        settings = dataclasses.replace(settings, micro_batch=default_micro_batch(model, settings.length))
    from transformers import get_linear_schedule_with_warmup

    arch = resolve(model)
    heads = list(dict.fromkeys((int(l), int(h)) for l, h in heads))  # rank order, no duplicates
    for l, h in heads:
        arch.check_head(l, h)
    if not heads:
        raise PearError("no heads to fit")
    dtype = dtype_name(model)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    key = fingerprint(model_spec, heads, settings, dtype)
    state = load_resume(ckpt_path, key, restart) if ckpt_path else None

    t0 = time.perf_counter()
    heldout = heldout_batch(model, tokenizer, settings)  # (eval_batch, 2n + 1) token ids, its own seed
    held_obj = None if settings.objective == "copy" else objective.batch(
        model, tokenizer, settings.eval_batch, heldout_seed(settings.seed))
    held_anchor = anchor.batch(tokenizer, objective.data_dir, settings.eval_batch, anchor_seed(settings.seed, -1),
                               settings.anchor_source) if settings.anchor else None

    def metrics(hs) -> dict[str, float]:
        m = proxy_metrics(model, heldout, settings.micro_batch if settings.objective == "copy" else None)
        if held_obj is not None:
            with torch.no_grad():
                m["objective_loss"] = sum(float(objective.loss(model, b, hs)) * len(b) for b in
                                          objective.split(held_obj, _micro(model, settings, held_obj))) / len(held_obj)
        if held_anchor is not None:  # 0 for the base model: how far the scales moved it on plain text
            with torch.no_grad():
                m["anchor_kl"] = sum(float(anchor.loss(model, b, hs, settings.anchor_source)) * len(b) for b in
                                     chunks(held_anchor, _micro(model, settings, held_anchor))) / len(held_anchor)
        return m

    with frozen(model), cpu_attention(model, short=objective.short), HeadScaling(model, heads, channels=settings.channels,
                                                                                          site=settings.site) as hs:
        alpha = hs.alpha  # (K,), or (K, head_dim) per channel; fp32, the only trainable tensor
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
                    "alpha": alpha.detach().cpu().clone(), "optimizer": clone_state(opt.state_dict()),
                    "scheduler": sched.state_dict(), "losses": list(losses), "before": before,
                    "seconds": seconds_before + time.perf_counter() - t0}

        good, saved_at = snapshot(), time.perf_counter()
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
                                        "--bounds unit" + resume_note(ckpt_path))
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    BOUNDS[settings.bounds].project(alpha)
                    if not torch.isfinite(alpha).all():
                        bad = [f"L{l}H{h}" for (l, h), a in zip(hs.heads, alpha.tolist()) if not math.isfinite(a)]
                        raise PearError(f"fit stopped at step {step + 1}: coefficient(s) {', '.join(bad)} "
                                        f"became non-finite (lr {settings.lr:g}); lower --lr" + resume_note(ckpt_path))
                    step += 1
                    losses.append(loss)
                    good = snapshot()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", alpha=f"[{float(alpha.detach().min()):.2f}, "
                                    f"{float(alpha.detach().max()):.2f}]")
                    if ckpt_path and distributed.is_main() and (  # data-parallel: rank 0 saves
                            step % settings.checkpoint_every == 0 or step == stop_at
                            or time.perf_counter() - saved_at >= settings.checkpoint_seconds):
                        save_resume(ckpt_path, good)
                        saved_at = time.perf_counter()
        except KeyboardInterrupt:
            if ckpt_path:
                save_resume(ckpt_path, good)
                print(f"\npear: fit interrupted after step {good['step']}/{settings.steps}; checkpoint saved to "
                      f"{ckpt_path}; run the same command again to resume", file=sys.stderr)
            raise
        finally:
            bar.close()
        seconds = seconds_before + time.perf_counter() - t0
        coefs = select(hs.coefficients(), settings.fold_layers, settings.strength)  # what is folded
        after = None
        if step >= settings.steps:  # measured on the model as it is folded
            if settings.fold_layers or settings.strength != 1:  # the kept scales alone
                with hs.disabled(), HeadScaling(model, coefs, site=settings.site) as kept:
                    after = metrics(kept)
            else:
                after = metrics(hs)
    heads = [h for h in heads if h in coefs]
    scores = dict(scores or {})
    return FitResult(heads=heads, coefficients=coefs, losses=losses, before=before, after=after,
                     settings=settings, step=step, seconds=seconds, resumed_from=resumed_from, model=model_spec,
                     dtype=dtype, scores={h: scores[h] for h in heads if h in scores}, k_selection=k_selection)
