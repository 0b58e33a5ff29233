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

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import write_text
from .backends import attention_backends, fits_in_memory
from .errors import PearError
from .families import Arch, resolve
from .proxy import ProxyBatch, allowed_token_ids, make_batch, parse_settings

HeadKey = tuple[int, int]  # (layer, head)
METHODS = ("exact", "fast")
# Suffix tokens (rows x length) per batched re-run. On CPU, GEMMs are already efficient at
# ~1k tokens and stacking copies only made each head slower (SmolLM2, N=20, n=50: 0.70 s per
# head at B=1, 0.76 at B=3, 1.04 at B=9), so CPU runs one head per call; GPUs want big batches.
TOKEN_BUDGET = {"cpu": 1024, "cuda": 65536}


# ---------------------------------------------------------------------------- the model's top
class _Top:
    """Final norm(s) + LM head (+ Gemma's logit soft-capping): last hidden state -> logits."""

    def __init__(self, model: nn.Module, arch: Arch):
        self.modules = []
        for path in arch.family.final:
            try:
                m = model.get_submodule(path)
            except AttributeError:  # absent (or None) in this configuration, e.g. OPT's project_out
                continue
            self.modules.append(m)
        self.lm_head = model.get_output_embeddings()
        self.vocab = self.lm_head.weight.shape[0]
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(
            getattr(cfg, "text_config", None), "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        for m in self.modules:
            hidden = m(hidden)
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def target_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """p(target) in fp32. hidden (R, P, d), targets (R, P) -> (R, P). Rows go through the
        LM head in chunks so the fp32 logits stay under ~256 MB."""
        rows = max(1, (1 << 26) // (hidden.shape[1] * self.vocab))
        out = []
        for h, t in zip(hidden.split(rows), targets.split(rows)):
            lp = self.logits(h).log_softmax(-1)  # (r, P, V)
            out.append(lp.gather(-1, t.unsqueeze(-1)).squeeze(-1).exp())
        return torch.cat(out)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def ablated_span(batch: ProxyBatch) -> slice:
    """Positions whose head outputs are ablated: the whole second copy (the 'suffix')."""
    start = batch.offset + batch.n
    return slice(start, start + batch.n)


def relative_change(p_ablated: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """Δπ = π̃/π − 1, π the mean of p over samples and scored positions. (..., N, P), (N, P) -> (...)"""
    return p_ablated.mean((-2, -1)) / p_clean.mean() - 1


class _CacheSlot:
    """Stands in, in captured block arguments, for the KV cache the block was called with."""


_CACHE = _CacheSlot()


def _capture(x, cache_type):
    """Detached copy of a block call's arguments, with any KV cache replaced by `_CACHE`."""
    if isinstance(x, cache_type):
        return _CACHE
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_capture(v, cache_type) for v in x)
    if isinstance(x, dict):
        return {k: _capture(v, cache_type) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------- clean pass
@dataclass
class CleanPass:
    """What one clean forward of a proxy batch leaves behind for the ablation re-runs.

    The forward runs in two calls, like generation: the prefix (BOS + first copy) fills a KV
    cache, then the suffix (second copy) runs on top of it. Ablations only touch the suffix,
    so re-runs start from a copy of `prefix_cache` and process the suffix tokens only.
    """

    batch: ProxyBatch
    prefix_cache: object  # transformers Cache after the prefix call (never mutated)
    block_inputs: list[tuple[tuple, dict]]  # per layer: (args, kwargs) of the suffix call; args[0] (N, S, d)
    probe_inputs: list[tuple[tuple, dict]]  # the same for 1 row: tells batched tensors apart
    means: list[torch.Tensor]  # per layer: (S, H*D) batch mean of the out-proj input on the suffix, fp32
    probs: torch.Tensor  # (N, P) fp32 clean p(correct next token)
    estimates: torch.Tensor | None = None  # (L, H) first-order Δπ (grad=True only)

    @property
    def scored(self) -> torch.Tensor:
        """Scored positions, counted from the start of the suffix. (P,)"""
        return self.batch.pred_positions - ablated_span(self.batch).start


def _two_calls(model, blocks, ids: torch.Tensor, start: int, store: list, grad: bool, extra_hooks=()):
    """Prefix with a fresh cache, then the suffix on it; `store[l]` gets block l's suffix-call
    arguments. Returns a snapshot of the cache as it was after the prefix."""
    from transformers.cache_utils import Cache

    def hook(layer):
        def pre(module, args, kwargs):
            store[layer] = (_capture(args, Cache), _capture(kwargs, Cache))
        return pre

    with torch.no_grad():
        cache = model.base_model(input_ids=ids[:, :start], use_cache=True).past_key_values
    if not isinstance(cache, Cache):
        raise PearError(f"{type(model).__name__} returned no KV cache; discovery needs one to re-run the suffix")
    snapshot = copy.deepcopy(cache)
    handles = [blk.register_forward_pre_hook(hook(l), with_kwargs=True) for l, blk in enumerate(blocks)]
    handles += [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
                for kind, module, fn in extra_hooks]
    try:
        with torch.set_grad_enabled(grad):
            model.base_model(input_ids=ids[:, start:], past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return snapshot


def clean_pass(model: nn.Module, batch: ProxyBatch, grad: bool = False, arch: Arch | None = None) -> CleanPass:
    """Run the clean batch once, capturing block inputs, head means and clean probabilities
    (and, if `grad`, the attribution-patching estimate of every head's Δπ)."""
    arch = arch or resolve(model)
    blocks = model.get_submodule(arch.family.blocks)
    top = _Top(model, arch)
    L, H, D = arch.n_layers, arch.n_heads, arch.head_dim
    ids = batch.input_ids.to(model.device)
    start = ablated_span(batch).start
    inputs, probe, means, acts, eps, last = [None] * L, [None] * L, [None] * L, [None] * L, [None] * L, [None]

    def proj_hook(layer):
        def hook(module, args):
            x = args[0]  # (N, S, H*D): the suffix is exactly the ablated span
            means[layer] = x.detach().float().mean(0)  # (S, H*D)
            if grad:
                acts[layer] = x.detach()
                eps[layer] = torch.zeros_like(x, requires_grad=True)
                return (x + eps[layer], *args[1:])
        return hook

    def last_hook(module, args, out):
        last[0] = _block_output(out)

    _two_calls(model, blocks, ids[:1], start, probe, grad=False)  # 1 row: which arguments are batched
    hooks = [("pre", p, proj_hook(l)) for l, p in enumerate(arch.out_projs)] + [("post", blocks[L - 1], last_hook)]
    prefix_cache = _two_calls(model, blocks, ids, start, inputs, grad, hooks)
    scored = batch.pred_positions - start
    with torch.set_grad_enabled(grad):
        h = last[0]  # on the last block's device (may differ from the input's under device_map)
        probs = top.target_probs(h[:, scored.to(h.device)], batch.targets.to(h.device))  # (N, P)
        estimates = None
        if grad:
            objective = probs.mean() / probs.mean().detach()  # π / π_clean: 1 at the clean run
            grads = torch.autograd.grad(objective, eps)
            estimates = torch.stack([
                ((means[l].to(acts[l].dtype) - acts[l]).float() * g.float()).view(*g.shape[:2], H, D).sum((0, 1, 3))
                .cpu() for l, g in enumerate(grads)])  # (L, H); layers may sit on different GPUs
    return CleanPass(batch, prefix_cache, inputs, probe, means, probs.detach(), estimates)


# ---------------------------------------------------------------------------- batched re-runs
class _Expand:
    """Repeat captured block arguments for B stacked copies of the batch (row i*B + j is
    sample i in copy j, the layout of `Cache.batch_repeat_interleave`).

    A tensor is batched if its leading size differs from that of the same argument in the
    1-row probe call: N rows, or N*heads for ALiBi biases stored batch-major (Bloom); MPT's
    per-head bias (heads, 1, T) and anything of leading size 1 broadcast and are left
    alone. Shared objects (RoPE cos/sin used by every layer) are expanded once. `_CACHE`
    becomes `self.cache`, the fresh cache of the current re-run.
    """

    def __init__(self, n_rows: int, reps: int):
        self.n, self.reps, self.memo, self.cache, self.template = n_rows, reps, {}, None, None

    def fresh_cache(self, prefix_cache):
        """A cache holding the prefix keys/values for the B copies, for one re-run.

        The B-fold prefix is built once (`template`); each re-run gets shallow copies of
        the cache and its layer objects, sharing the template's tensors: dynamic cache
        layers append with torch.cat (new tensors), so the template is never written to.
        Without per-layer objects (other cache classes), fall back to a deep copy.
        """
        if self.template is None:
            self.template = copy.deepcopy(prefix_cache)
            if self.reps > 1:
                self.template.batch_repeat_interleave(self.reps)
        layers = getattr(self.template, "layers", None)
        if not isinstance(layers, list) or not all(type(x).__name__.startswith("Dynamic") for x in layers):
            return copy.deepcopy(self.template)
        cache = copy.copy(self.template)
        cache.layers = [copy.copy(x) for x in layers]
        return cache

    def __call__(self, x, ref=None):
        if x is _CACHE:
            return self.cache
        if isinstance(x, (tuple, list)):
            refs = ref if isinstance(ref, (tuple, list)) and len(ref) == len(x) else [None] * len(x)
            return type(x)(self(v, r) for v, r in zip(x, refs))
        if isinstance(x, dict):
            refs = ref if isinstance(ref, dict) else {}
            return {k: self(v, refs.get(k)) for k, v in x.items()}
        if not torch.is_tensor(x):
            return x
        if id(x) not in self.memo:
            if torch.is_tensor(ref) and ref.dim() == x.dim():
                batched = x.dim() >= 1 and ref.shape[0] != x.shape[0]
            else:  # no probe counterpart: guess from the shape
                batched = x.dim() >= 2 and x.shape[0] % self.n == 0
            y = x.unflatten(0, (self.n, -1)).repeat_interleave(self.reps, 0).flatten(0, 1) if batched else x
            self.memo[id(x)] = (x, y)  # keep x alive so its id is not reused
        return self.memo[id(x)][1]


@torch.no_grad()
def ablate_heads(model: nn.Module, clean: CleanPass, layer: int, heads: list[int],
                 arch: Arch | None = None, expand: _Expand | None = None) -> torch.Tensor:
    """Mean-ablate each head of `heads` (all in `layer`) in its own copy of the batch, in one
    re-run of blocks layer..L-1 on the suffix, from the cached residual stream and prefix
    KV cache. Returns p̃, (B, N, P) fp32."""
    arch = arch or resolve(model)
    blocks = model.get_submodule(arch.family.blocks)
    B, N = len(heads), clean.batch.input_ids.shape[0]
    H, D = arch.n_heads, arch.head_dim
    expand = expand or _Expand(N, B)
    expand.cache = expand.fresh_cache(clean.prefix_cache)
    mean = clean.means[layer].view(-1, H, D)  # (S, H, D)

    def hook(module, args):
        x = args[0].clone()  # (N*B, S, H*D)
        xv = x.view(N, B, x.shape[1], H, D)
        for j, h in enumerate(heads):
            xv[:, j, :, h] = mean[:, h].to(x.dtype)
        return (x, *args[1:])

    hidden = clean.block_inputs[layer][0][0].repeat_interleave(B, 0)  # (N*B, S, d)
    handle = arch.out_projs[layer].register_forward_pre_hook(hook)
    try:
        for l in range(layer, arch.n_layers):
            a, kw = clean.block_inputs[l]
            pa, pkw = clean.probe_inputs[l]
            hidden = _block_output(blocks[l](hidden, *expand(a[1:], pa[1:]), **expand(kw, pkw)))
    finally:
        handle.remove()
        expand.cache = None
    scored = clean.scored.to(hidden.device)
    targets = clean.batch.targets.to(hidden.device).repeat_interleave(B, 0)
    p = _Top(model, arch).target_probs(hidden[:, scored], targets)  # (N*B, P)
    return p.view(N, B, -1).transpose(0, 1)


def _default_batch_heads(arch: Arch, batch: ProxyBatch, device: torch.device) -> int:
    budget = TOKEN_BUDGET.get(torch.device(device).type, TOKEN_BUDGET["cpu"])
    return max(1, min(arch.n_heads, budget // (batch.input_ids.shape[0] * batch.n)))


class _Resume:
    """Resume state of the exact re-runs: the (setting, layer, head) scores done so far.

    Every chunk of heads adds its Δπ into `scores`; the state (scores, forward-equivalents, the
    set of done (setting, layer, head)) is written atomically at most every `every` seconds and
    when the work is interrupted, so running the same discovery again skips what is done and
    gives the same scores (same chunks, same order of additions). A state from other settings,
    seed, model or head list is an error, as for the fit's checkpoints."""

    def __init__(self, path, key: dict, scores: torch.Tensor, every: float = 20.0):
        self.path, self.key, self.every = (Path(path) if path else None), key, every
        self.scores, self.fe, self.done, self.t = scores, 0.0, set(), time.perf_counter()
        if self.path is not None and self.path.exists():
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
                old = state["key"]
            except Exception as e:
                raise PearError(f"cannot read discovery checkpoint {self.path} ({type(e).__name__}); delete it") from None
            if old != key:
                raise PearError(f"discovery checkpoint {self.path} is from a different run; delete it to start over")
            self.scores.copy_(state["scores"])
            self.fe, self.done = float(state["fe"]), {tuple(x) for x in state["done"]}

    def save(self, force: bool = False) -> None:
        if self.path is None or not (force or time.perf_counter() - self.t >= self.every):
            return
        from .atomic import open_atomic

        with open_atomic(self.path, "wb") as f:
            torch.save({"key": self.key, "scores": self.scores.clone(), "fe": self.fe,
                        "done": sorted(self.done)}, f)
        self.t = time.perf_counter()


def _exact(model, arch: Arch, cleans: list[CleanPass], heads: list[HeadKey], batch_heads: int | None = None,
           bar=None, work: "_Work | None" = None, resume: _Resume | None = None) -> tuple[torch.Tensor, float]:
    """Exact Δπ of `heads`, averaged over the clean passes. Returns ((L, H) scores, forward-equivalents)."""
    L = arch.n_layers
    resume = resume or _Resume(None, {}, torch.zeros(L, arch.n_heads))
    scores = resume.scores
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    try:
        _exact_passes(model, arch, cleans, by_layer, len(heads), batch_heads, bar, work, resume)
    except KeyboardInterrupt:
        resume.save(force=True)
        raise
    return scores, resume.fe


def _exact_passes(model, arch, cleans, by_layer, n_heads, batch_heads, bar, work, resume: _Resume) -> None:
    L, scores = arch.n_layers, resume.scores
    for si, clean in enumerate(cleans):
        done = 0
        N, T = clean.batch.input_ids.shape
        S = clean.batch.n
        B = batch_heads or _default_batch_heads(arch, clean.batch, clean.probs.device)
        expanders: dict[int, _Expand] = {}
        for layer in sorted(by_layer):
            hs = by_layer[layer]
            i = 0
            while i < len(hs):
                chunk = hs[i:i + B]
                if all((si, layer, h) in resume.done for h in chunk):  # done before an interruption
                    i += len(chunk)
                    done += len(chunk)
                    if bar is not None:
                        bar.update(work.ablation(clean.batch, layer) * len(chunk))
                    continue
                exp = expanders.setdefault(len(chunk), _Expand(N, len(chunk)))
                ok, p = fits_in_memory(ablate_heads, model, clean, layer, chunk, arch, exp,
                                       can_shrink=len(chunk) > 1)  # p: (b, N, P)
                if not ok:  # out of GPU memory: halve the head batch for the rest of this setting
                    expanders.clear()  # their prefix-cache copies are the largest thing to free
                    torch.cuda.empty_cache()
                    B = max(1, len(chunk) // 2)
                    continue
                i += len(chunk)
                scores[layer, chunk] += relative_change(p, clean.probs).cpu() / len(cleans)
                resume.fe += len(chunk) * (L - layer) / L * S / T / len(cleans)  # in forwards of this batch
                resume.done.update((si, layer, h) for h in chunk)
                resume.save()
                done += len(chunk)
                if bar is not None:
                    bar.set_postfix_str(f"setting {si + 1}/{len(cleans)}: heads {done}/{n_heads}", refresh=False)
                    bar.update(work.ablation(clean.batch, layer) * len(chunk))


# ---------------------------------------------------------------------------- result
@dataclass
class DiscoveryResult:
    """Every head's Δπ and how it was obtained. `scores` (L, H) fp32; rank 1 = most suppressive."""

    scores: torch.Tensor
    method: str
    settings: list[tuple[int, int]]
    seed: int
    seconds: float
    forward_equivalents: float
    model_spec: str | None = None
    k: int = 10
    exact: torch.Tensor | None = None  # (L, H) bool: score is an exact mediation score
    estimates: torch.Tensor | None = None  # (L, H) first-order estimates ("fast")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = self.scores.float().cpu()
        if self.exact is None:
            self.exact = torch.full(self.scores.shape, self.method == "exact", dtype=torch.bool)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def ranking(self) -> list[HeadKey]:
        """All heads, rank 1 first: descending score; exactly scored heads before estimated
        ones (for "fast": the re-checked top M outrank heads known only to first order)."""
        L, H = self.scores.shape
        keys = [(l, h) for l in range(L) for h in range(H)]
        return sorted(keys, key=lambda k: (not bool(self.exact[k]), -float(self.scores[k]), k))

    def top(self, k: int | None = None) -> list[HeadKey]:
        """The `k` (default: self.k) most suppressive heads, by descending score."""
        return self.ranking()[: self.k if k is None else k]

    def to_dict(self) -> dict:
        rank = {key: i + 1 for i, key in enumerate(self.ranking())}
        heads = []
        for (l, h) in self.ranking():
            est = None if self.estimates is None else float(self.estimates[l, h])
            heads.append({"layer": l, "head": h, "score": float(self.scores[l, h]), "rank": rank[(l, h)],
                          "exact": bool(self.exact[l, h]), "estimate": est})
        return {"model": self.model_spec, "method": self.method, "settings": [list(s) for s in self.settings],
                "seed": self.seed, "seconds": round(self.seconds, 3),
                "forward_equivalents": round(self.forward_equivalents, 3), "n_layers": self.n_layers,
                "n_heads": self.n_heads, "top_k": self.k, **self.extra, "heads": heads}

    def save(self, path: str | Path, plot: bool = True) -> Path:
        """Write heads.json (atomically) and, beside it, the heatmap PNG (same stem)."""
        path = Path(path)
        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        if plot:
            from .plots import heatmap

            title = f"Δπ when mean-ablated ({self.method}; {self.model_spec or 'model'}); top {self.k} outlined"
            heatmap(self.scores, self.top(), path.with_suffix(".png"), title=title)
        return path


def read_heads(path: str | Path) -> DiscoveryResult:
    """Read a heads.json written by `DiscoveryResult.save`; PearError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise PearError(f"heads file not found: {path}")
    try:
        d = json.loads(path.read_text())
        L, H = int(d["n_layers"]), int(d["n_heads"])
        scores = torch.full((L, H), float("nan"))
        exact = torch.zeros(L, H, dtype=torch.bool)
        estimates = torch.full((L, H), float("nan"))
        has_est = False
        for r in d["heads"]:
            l, h = r["layer"], r["head"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (l, h)) or not (0 <= l < L and 0 <= h < H):
                raise PearError(f"{path}: bad head entry layer={l!r} head={h!r} for {L} layers x {H} heads")
            if not math.isnan(scores[l, h]):
                raise PearError(f"{path}: layer {l} head {h} appears twice")
            scores[l, h] = float(r["score"])
            exact[l, h] = bool(r.get("exact", d["method"] == "exact"))
            if r.get("estimate") is not None:
                estimates[l, h] = float(r["estimate"])
                has_est = True
        if torch.isnan(scores).any():
            raise PearError(f"{path}: {int(torch.isnan(scores).sum())} of {L * H} heads have no score")
        known = {"model", "method", "settings", "seed", "seconds", "forward_equivalents", "n_layers", "n_heads",
                 "top_k", "heads"}
        return DiscoveryResult(
            scores=scores, method=str(d["method"]), settings=[tuple(int(v) for v in s) for s in d["settings"]],
            seed=int(d["seed"]), seconds=float(d["seconds"]), forward_equivalents=float(d["forward_equivalents"]),
            model_spec=d.get("model"), k=int(d.get("top_k", 10)), exact=exact,
            estimates=estimates if has_est else None, extra={k: v for k, v in d.items() if k not in known})
    except json.JSONDecodeError as e:
        raise PearError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PearError(f"{path}: not a pear heads file (expected the keys of `pear discover` output; "
                        f"problem: {type(e).__name__} {e})") from None


# ---------------------------------------------------------------------------- entry point
def proxy_batches(model, tokenizer, settings: list[tuple[int, int]], seed: int) -> list[ProxyBatch]:
    """One seeded proxy batch per setting (one generator, drawn in order)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = allowed_token_ids(tokenizer, vocab)
    return [make_batch(tokenizer, vocab, n, length, g, allowed) for n, length in settings]


class _Work:
    """Cost model for the progress bar's time-left estimate, in block-token units: one decoder
    block on one token costs 1, the LM head on one token `lm` (its weights over a block's)."""

    def __init__(self, model: nn.Module, arch: Arch):
        block = model.get_submodule(arch.family.blocks)[0]
        self.L = arch.n_layers
        self.lm = model.get_output_embeddings().weight.numel() / max(1, sum(p.numel() for p in block.parameters()))

    def clean(self, batch: ProxyBatch, grad: bool) -> int:  # integers: sums are exact, the bar ends at 100%
        N, T = batch.input_ids.shape
        return round((N + 1) * T * self.L + N * (batch.n - 1) * self.lm + (2 * N * batch.n * self.L if grad else 0))

    def ablation(self, batch: ProxyBatch, layer: int) -> int:
        N = batch.input_ids.shape[0]
        return round(N * batch.n * (self.L - layer) + N * (batch.n - 1) * self.lm)


def _progress(total_work: float, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_work, desc=desc, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
    bar.set_postfix_str("clean passes")
    return bar


def discover(model: nn.Module, tokenizer=None, settings: list[tuple[int, int]] | str | None = None,
             method: str = "exact", seed: int = 0, top_m: int | None = None, k: int = 10,
             batch_heads: int | None = None, progress: bool = True, model_spec: str | None = None,
             checkpoint: str | Path | None = None) -> DiscoveryResult:
    """Score every attention head by Δπ under mean ablation on the proxy copying task.

    method "exact": every head by batched, prefix-cached re-runs. "fast": attribution
    patching for all heads, then exact scores for the top `top_m` (default max(4k, 32)).
    settings: list of (N samples, n length) or "20x50,40x25"; None = the paper's four.
    batch_heads: ablations per re-run (default: as many heads as fit TOKEN_BUDGET tokens).
    checkpoint: file for the resume state of the exact re-runs (`_Resume`): after Ctrl-C, the
    same call continues where it stopped; removed when discovery completes.
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
    if k < 1:
        raise PearError(f"k must be >= 1, got {k}")
    if batch_heads is not None and batch_heads < 1:
        raise PearError(f"batch_heads must be >= 1, got {batch_heads}")
    arch = resolve(model)
    L, H = arch.n_layers, arch.n_heads
    top_m = min(L * H, max(4 * k, 32) if top_m is None else top_m)
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
            bar = _progress(sum(clean_work) + guess, f"{method} Δπ", progress)
            cleans = []
            for i, (b, w) in enumerate(zip(batches, clean_work)):
                cleans.append(clean_pass(model, b, grad=grad, arch=arch))
                if bar is not None:
                    bar.set_postfix_str(f"clean passes {i + 1}/{len(batches)}", refresh=False)
                    bar.update(w)
            estimates = None
            if grad:
                estimates = torch.stack([c.estimates for c in cleans]).mean(0).float().cpu()  # (L, H)
                order = estimates.flatten().argsort(descending=True)[:top_m].tolist()
                heads = [(i // H, i % H) for i in order]
                for c in cleans:
                    c.estimates = None
            else:
                heads = [(l, h) for l in range(L) for h in range(H)]
            if bar is not None:
                bar.total = sum(clean_work) + sum(work.ablation(b, l) for b in batches for l, _ in heads)
            key = {"model": model_spec, "method": method, "settings": [list(x) for x in settings], "seed": seed,
                   "heads": [list(h) for h in heads], "dtype": str(next(model.parameters()).dtype)}
            resume = _Resume(checkpoint, key, torch.zeros(L, H))
            if resume.done:
                print(f"pear: resuming discovery from {checkpoint} ({len(resume.done)} re-runs done)", file=sys.stderr)
            exact_scores, fe_exact = _exact(model, arch, cleans, heads, batch_heads, bar, work, resume)
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
    extra = {"top_m": top_m} if grad else {}
    return DiscoveryResult(scores=scores, method=method, settings=list(settings), seed=seed,
                           seconds=time.perf_counter() - t0, forward_equivalents=fe + fe_exact,
                           model_spec=model_spec or getattr(model.config, "_name_or_path", None), k=k,
                           exact=exact, estimates=estimates, extra=extra)


@torch.no_grad()
def naive_scores(model: nn.Module, tokenizer=None, settings: list[tuple[int, int]] | None = None,
                 seed: int = 0, heads: list[HeadKey] | None = None) -> torch.Tensor:
    """Reference implementation: one full forward of the model per head, no caching or
    batching. Slow (1 + L*H forwards per setting); for tests and benchmarks. (L, H); heads
    not in `heads` are NaN."""
    from .proxy import target_logprobs

    arch = resolve(model)
    settings = parse_settings(None) if settings is None else settings
    heads = heads or [(l, h) for l in range(arch.n_layers) for h in range(arch.n_heads)]
    D = arch.head_dim
    out = torch.zeros(arch.n_layers, arch.n_heads)
    for batch in proxy_batches(model, tokenizer, settings, seed):
        ids = batch.input_ids.to(model.device)
        span = ablated_span(batch)
        means = {}
        hooks = [p.register_forward_pre_hook(lambda m, a, l=l: means.__setitem__(l, a[0][:, span].float().mean(0)))
                 for l, p in enumerate(arch.out_projs)]
        try:
            p_clean = target_logprobs(model(ids, use_cache=False).logits, batch).exp()
        finally:
            for hk in hooks:
                hk.remove()
        for l, h in heads:
            def ablate(m, a, l=l, h=h):
                x = a[0].clone()
                x[:, span, h * D:(h + 1) * D] = means[l][:, h * D:(h + 1) * D].to(x.dtype)
                return (x, *a[1:])
            hk = arch.out_projs[l].register_forward_pre_hook(ablate)
            try:
                p = target_logprobs(model(ids, use_cache=False).logits, batch).exp()
            finally:
                hk.remove()
            out[l, h] += float(relative_change(p, p_clean)) / len(settings)
    mask = torch.ones_like(out, dtype=torch.bool)
    for key in heads:
        mask[key] = False
    return out.masked_fill(mask, float("nan"))
