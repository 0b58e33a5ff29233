"""The clean pass: one forward of a proxy batch, in two calls, capturing what the re-runs need.

The prefix (BOS + first copy) fills a KV cache, then the suffix (second copy) runs on top of
it; forward pre-hooks record each block's suffix-call arguments, the batch mean of each output
projection's input, and the clean probabilities. With ``grad=True`` the same pass also gives
the attribution-patching estimates (`pear.discover.attribution`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PearError
from ..families import Arch, resolve
from ..proxy import ProxyBatch, allowed_token_ids, make_batch
from .attribution import first_order_estimates


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
        estimates = first_order_estimates(probs, means, acts, eps, H, D) if grad else None
    return CleanPass(batch, prefix_cache, inputs, probe, means, probs.detach(), estimates)


def proxy_batches(model, tokenizer, settings: list[tuple[int, int]], seed: int) -> list[ProxyBatch]:
    """One seeded proxy batch per setting (one generator, drawn in order)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = allowed_token_ids(tokenizer, vocab)
    return [make_batch(tokenizer, vocab, n, length, g, allowed) for n, length in settings]
