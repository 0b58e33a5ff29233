"""Exact Δπ: batched, prefix-cached re-runs of the suffix, one ablated head per batch copy.

Re-runs start from the cached residual stream entering the ablated head's layer and run the
suffix only, on a shallow copy of the prefix KV cache; B heads of one layer are ablated in B
stacked copies of the batch (`_Expand`). `_Resume` keeps the state of the re-runs so an
interrupted discovery continues where it stopped.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from ..backends import fits_in_memory
from ..errors import PearError
from ..families import Arch, resolve
from ..proxy import ProxyBatch
from .capture import _CACHE, CleanPass, _block_output, _Top, relative_change
from .progress import _Work

HeadKey = tuple[int, int]  # (layer, head)
# Suffix tokens (rows x length) per batched re-run. On CPU, GEMMs are already efficient at
# ~1k tokens and stacking copies only made each head slower (SmolLM2, N=20, n=50: 0.70 s per
# head at B=1, 0.76 at B=3, 1.04 at B=9), so CPU runs one head per call; GPUs want big batches.
TOKEN_BUDGET = {"cpu": 1024, "cuda": 65536}


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
        from ..atomic import open_atomic

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
