"""Head discovery: find the attention heads that suppress copying from the context.

The score of head (l, h) is Δπ, the relative change in the probability of the correct next
token on the proxy copying task (`pear.proxy`) when that head is mean-ablated:

* Mean ablation: the head's output (its slice of the input of the attention output
  projection, ``x[..., h*D:(h+1)*D]``) is replaced, at every position of the second copy,
  by its mean over the N samples of the batch *at that position* (a (positions, D) mean:
  position matters in a copying task, token identity does not, as every row draws fresh
  random tokens). First-copy positions keep their clean values: ablating there would change
  the context being copied, not the copying.
* π = p(correct next token) averaged over the N samples and the scored positions (x1..x(n-1)
  of the second copy); Δπ = π̃/π − 1, then averaged over the (N, n) settings. The ratio is
  taken after averaging because per-position probabilities can be tiny: on SmolLM2-135M the
  first scored position has a batch-mean p of 1e-5..1e-3, and per-position ratios there
  would dominate the score with noise.
* Δπ > 0: the model copies better without the head: a suppression head. Rank 1 = largest Δπ.

Exact discovery (``method="exact"``) computes Δπ for every head, fast:

1. Suffix-only re-runs: one clean forward per setting runs in two calls, like generation:
   the prefix (BOS + first copy) fills a KV cache, then the suffix (second copy) runs on
   top of it. Ablations only touch the suffix and cannot change the prefix (causal
   attention), so every re-run processes the n suffix tokens only, attending to a shallow
   copy of the cached prefix keys/values (a fresh cache object per re-run: a shared cache
   would accumulate stale keys). Forward pre-hooks record each decoder block's suffix input
   and the arguments of its call (masks, RoPE cos/sin, ALiBi, cache positions), the batch
   mean of each output projection's input, and the clean probabilities.
2. Prefix caching over layers: ablating a head of layer l cannot change anything below
   layer l, so the re-run starts from the cached residual stream entering block l and runs
   blocks l..L-1 only (on average half the blocks).
3. Head batching: the cached batch is stacked B times along the batch dimension (row i*B+j:
   sample i, copy j); copy j ablates a different head of layer l (one pre-hook on that
   layer's output projection writes all B replacements), so one call evaluates B
   ablations. Captured arguments with a batch dimension are repeated to match; which ones
   have one is learnt from a 1-row probe forward (``_Expand``). B comes from a token budget
   (`TOKEN_BUDGET`): large on GPU; on CPU ~2k tokens, where bigger batches were slower.
4. The LM head runs only on the scored positions, in row chunks so the fp32 logits stay
   small; probabilities are always computed in fp32 (also for bf16 models).

Fast discovery (``method="fast"``, attribution patching) estimates every head's Δπ from one
forward and one backward per setting. With F = π/π_clean (π_clean held constant, so F = 1
on the clean run), the first-order change under an ablation δ is Δπ = ΔF ≈ Σ ∂F/∂a · δ,
where a is the output projection's input and δ = (batch mean − a) on the head's slice of
the suffix, zero elsewhere; the sum runs over samples, suffix positions and the head's D
channels. The gradient is taken with respect to a zero tensor added to a, so it is the
total derivative through all later layers, whatever the weights' requires_grad. Then the
top M candidates by estimate (default max(4K, 32)) are re-scored exactly, re-using the
cached clean passes; their exact scores replace the estimates and rank first.

Several processes (`torchrun`, `accelerate launch`; `pear.distributed`): every rank runs the
clean passes (cheap next to the re-runs) and takes rank 0's candidate list; the heads to
re-check exactly are dealt round-robin from the lowest layer up (the costliest re-runs first,
so the shares cost about the same), each rank re-checks its share, and the scores are
all-gathered: every rank ends with the whole result, equal to one process's (a head's score
is the same sum over the same settings; batched re-runs only group heads differently).
Each rank keeps its own resume file (`.rankR-of-W`).

Forward-equivalents: decoder-block work, counted as block calls weighted by rows × tokens,
divided by that of one clean forward of the batch (n_layers × N × T, T = 2n + 1 with BOS),
averaged over settings. A clean pass counts 1 (+ 1/N for the probe), a backward through the
suffix 2 × n/T, an exact re-run of B heads from layer l B × (L − l)/L × n/T. Embedding and
LM-head work is not counted. A naive exact pass (one full forward per head) costs
1 + n_layers × n_heads.

Measured on SmolLM2-135M (bf16, 2 busy CPU cores, the paper's settings; see
benchmarks/results/discovery_fast_vs_exact.json): exact 69 forward-equivalents (naive:
271) and 1.0k CPU-seconds (naive, extrapolated: 2.9k); fast 12 forward-equivalents and
180 CPU-seconds, with the same top 20 as exact (Spearman 0.89 over all 270 heads; 0.82 for
the first-order estimates alone).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..backends import attention_backends
from ..errors import PearError
from ..families import resolve
from ..proxy import parse_settings
from ..heads import choose_k, top_m_plan
from .attribution import candidates
from .capture import CleanPass, ablated_span, clean_pass, proxy_batches, relative_change
from .exact import TOKEN_BUDGET, _exact, _Resume, ablate_heads
from .progress import _progress, _Work
from .reference import naive_scores
from .result import DiscoveryResult, HeadKey, read_heads

METHODS = ("exact", "fast")
__all__ = ["METHODS", "TOKEN_BUDGET", "CleanPass", "DiscoveryResult", "HeadKey", "ablate_heads", "ablated_span",
           "clean_pass", "discover", "naive_scores", "proxy_batches", "read_heads", "relative_change"]


def discover(model: nn.Module, tokenizer=None, settings: list[tuple[int, int]] | str | None = None,
             method: str = "exact", seed: int = 0, top_m: int | None = None, k: int | str = 10,
             batch_heads: int | None = None, progress: bool = True, model_spec: str | None = None,
             checkpoint: str | Path | None = None, record: dict | None = None) -> DiscoveryResult:
    """Score every attention head by Δπ under mean ablation on the proxy copying task.

    method "exact": every head by batched, prefix-cached re-runs. "fast": attribution
    patching for all heads, then exact scores for the top `top_m` (default `pear.heads.top_m_plan`:
    max(4k, 32), or 32 for k "auto"). k: the heads selected by `pear.heads` (an int, or "auto"),
    recorded as the result's K (heads.json's top_k, outlined in the heatmap).
    settings: list of (N samples, n length) or "20x50,40x25"; None = the paper's four.
    batch_heads: ablations per re-run (default: as many heads as fit TOKEN_BUDGET tokens).
    checkpoint: file for the resume state of the exact re-runs (`_Resume`): after Ctrl-C, the
    same call continues where it stopped; removed when discovery completes.
    record: more provenance for the result's `extra` (how the caller chose `top_m`).
    Under torchrun / accelerate launch the exact re-runs are split over the ranks and every
    rank returns the whole result.
    The model is not modified (hooks are removed on exit, even on errors).
    """
    if method not in METHODS:
        raise PearError(f"unknown discovery method '{method}'; use one of {', '.join(METHODS)}")
    settings = parse_settings(settings) if isinstance(settings, str) or settings is None else [tuple(s) for s in settings]
    if not settings:
        raise PearError("no proxy settings given")
    if min(n for n, _ in settings) < 2:
        raise PearError("discovery needs N >= 2 samples per setting: with one, the batch mean is the "
                        "sample itself and mean ablation changes nothing")
    if k != "auto" and (not isinstance(k, int) or k < 1):
        raise PearError(f"k must be 'auto' or an integer >= 1, got {k!r}")
    if batch_heads is not None and batch_heads < 1:
        raise PearError(f"batch_heads must be >= 1, got {batch_heads}")
    distributed.init()  # data-parallel under torchrun / accelerate launch
    arch = resolve(model)
    L, H = arch.n_layers, arch.n_heads
    top_m = min(L * H, top_m_plan(k, top_m=top_m)[-1])
    if top_m < 1:
        raise PearError(f"top_m must be >= 1, got {top_m}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    grad = method == "fast"
    n_exact = top_m if grad else L * H
    bar = None
    with attention_backends():  # many batch shapes: cuDNN would build an execution plan for each
        try:
            batches = proxy_batches(model, tokenizer, settings, seed)
            # one clean forward, a 1-row probe, and for "fast" a backward through the suffix (x2)
            fe = sum(1 + 1 / b.input_ids.shape[0] + (2 * b.n / b.input_ids.shape[1] if grad else 0)
                     for b in batches) / len(batches)
            # the progress bar (for "fast" the re-checked heads' layers are not known yet:
            # assume the average depth until they are)
            work = _Work(model, arch)
            clean_work = [work.clean(b, grad) for b in batches]
            guess = sum(work.ablation(b, l) for b in batches for l in range(L)) * n_exact // L
            bar = _progress(sum(clean_work) + guess // distributed.world_size(), f"{method} Δπ",
                            progress and distributed.is_main())  # data-parallel: rank 0 reports
            cleans = []
            for i, (b, w) in enumerate(zip(batches, clean_work)):
                cleans.append(clean_pass(model, b, grad=grad, arch=arch))
                if bar is not None:
                    bar.set_postfix_str(f"clean passes {i + 1}/{len(batches)}", refresh=False)
                    bar.update(w)
            estimates = None
            if grad:
                estimates, heads = candidates([c.estimates for c in cleans], top_m)
                for c in cleans:
                    c.estimates = None
                estimates, heads = distributed.broadcast((estimates, heads))  # data-parallel: one candidate list
            else:
                heads = [(l, h) for l in range(L) for h in range(H)]
            mine = distributed.shard(sorted(heads, key=lambda x: x[0]))  # data-parallel: low layers dealt first
            if bar is not None:
                bar.total = sum(clean_work) + sum(work.ablation(b, l) for b in batches for l, _ in mine)
            if checkpoint is not None and distributed.world_size() > 1:  # one resume file per rank
                checkpoint = Path(f"{checkpoint}.rank{distributed.rank()}-of-{distributed.world_size()}")
            key = {"model": model_spec, "method": method, "settings": [list(x) for x in settings], "seed": seed,
                   "heads": [list(h) for h in mine], "dtype": str(next(model.parameters()).dtype)}
            resume = _Resume(checkpoint, key, torch.zeros(L, H))
            if resume.done:
                print(f"pear: resuming discovery from {checkpoint} ({len(resume.done)} re-runs done)", file=sys.stderr)
            exact_scores, fe_exact = _exact(model, arch, cleans, mine, batch_heads, bar, work, resume)
            if distributed.world_size() > 1:  # data-parallel: every rank's share, on every rank
                exact_scores, fe_exact = _merge(distributed.gather((mine, exact_scores, fe_exact)), L, H)
            if checkpoint is not None:
                Path(checkpoint).unlink(missing_ok=True)
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)
    exact = torch.zeros(L, H, dtype=torch.bool)
    for key in heads:
        exact[key] = True
    scores = exact_scores if estimates is None else torch.where(exact, exact_scores, estimates)
    extra = {**({"top_m": top_m} if grad else {}), **(record or {})}
    if k == "auto":
        try:
            k = choose_k(scores.flatten().tolist())[0]
        except PearError:  # no head raises copying: nothing to outline
            k = 0
    return DiscoveryResult(scores=scores, method=method, settings=list(settings), seed=seed,
                           seconds=time.perf_counter() - t0, forward_equivalents=fe + fe_exact,
                           model_spec=model_spec or getattr(model.config, "_name_or_path", None), k=k,
                           exact=exact, estimates=estimates, extra=extra)


def _merge(parts: list, L: int, H: int) -> tuple[torch.Tensor, float]:
    """The exact scores of every rank's heads in one (L, H) tensor, and the ranks' summed
    forward-equivalents (the work of all ranks together, as one process would count it)."""
    scores = torch.zeros(L, H)
    for heads, s, _ in parts:
        for key in heads:
            scores[key] = s[key]
    return scores, sum(fe for _, _, fe in parts)
