"""What long work will cost, said before it starts, from one measured step on this machine.

The same command takes 4 minutes on one CPU and 2 hours on another (no native bf16, other
load). `pear run` times one forward pass and one forward + backward of a fit batch, then
scales them by the work it is about to do: discovery's cost model (`discover._Work`, in
block-token units) and the fit's steps. It is an estimate (printed as one line, ~5 %
accuracy is not the goal); the progress bars that follow carry their own ETA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class RunEstimate:
    forward_s: float  # one no-grad forward of a fit batch
    step_s: float  # one fit step (forward + backward through the head scales)
    discover_s: float
    fit_s: float

    @property
    def total_s(self) -> float:
        return self.discover_s + self.fit_s

    def line(self) -> str:
        return (f"pear: estimate from a measured step (forward {self.forward_s:.2f} s, fit step {self.step_s:.2f} s): "
                f"discover ~{fmt_seconds(self.discover_s)}, fit ~{fmt_seconds(self.fit_s)}, "
                f"total ~{fmt_seconds(self.total_s)}")

    def as_dict(self) -> dict:
        return {k: round(getattr(self, k), 2) for k in ("forward_s", "step_s", "discover_s", "fit_s", "total_s")}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def estimate_run(model, tokenizer, fit_settings, discovery_settings, *, method: str, top_m: int,
                 seed: int = 0) -> RunEstimate:
    """Measure one fit-sized forward and one fit step, and scale them to discovery and the fit."""
    from .discover import proxy_batches
    from .discover.progress import _Work
    from .families import resolve
    from .proxy import _nll, default_micro_batch, make_model_batch, scored_logits
    from .training import cpu_attention, frozen
    from .folding import HeadScaling

    arch = resolve(model)
    L, H = arch.n_layers, arch.n_heads
    fs = fit_settings
    micro = fs.micro_batch or default_micro_batch(model, fs.length) or fs.batch
    batch = make_model_batch(model, tokenizer, min(fs.batch, micro), fs.length, seed=seed)
    chunks = fs.batch / len(batch.input_ids)  # micro-batches per step
    with frozen(model), cpu_attention(model):
        with torch.no_grad():
            forward = _timed(lambda: model(batch.input_ids.to(model.device), use_cache=False))

        def step():  # the backward runs down to the first scaled head; the heads are not chosen yet,
            with HeadScaling(model, [(0, 0)]):  # so a head of layer 0 times the deepest one (an upper bound)
                _nll(scored_logits(model, batch), batch).mean().backward()

        step_s = _timed(step) * chunks
    work = _Work(model, arch)
    units_per_s = work.clean(batch, grad=False) / max(forward, 1e-6)
    grad = method == "fast"
    batches = proxy_batches(model, tokenizer, [tuple(s) for s in discovery_settings], seed)
    n_exact = min(top_m, L * H) if grad else L * H
    units = sum(work.clean(b, grad) for b in batches)
    units += sum(work.ablation(b, l) for b in batches for l in range(L)) * n_exact // L
    fit_s = fs.steps * step_s + 2 * forward * max(1.0, fs.eval_batch / max(1, len(batch.input_ids)))
    return RunEstimate(forward, step_s, units / units_per_s, fit_s)
