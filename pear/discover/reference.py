"""The reference implementation of Δπ: one full forward per head, no caching or batching.

Slow (1 + L*H forwards per setting); for tests and benchmarks, which check the fast paths
against it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import resolve
from ..proxy import parse_settings, target_logprobs
from .capture import ablated_span, proxy_batches, relative_change

HeadKey = tuple[int, int]  # (layer, head)


@torch.no_grad()
def naive_scores(model: nn.Module, tokenizer=None, settings: list[tuple[int, int]] | None = None,
                 seed: int = 0, heads: list[HeadKey] | None = None) -> torch.Tensor:
    """Reference implementation: one full forward of the model per head, no caching or
    batching. Slow (1 + L*H forwards per setting); for tests and benchmarks. (L, H); heads
    not in `heads` are NaN."""
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
