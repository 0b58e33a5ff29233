"""Attention for the compiled one-token decoding step: the key/value heads read once per group,
and, where every row attends to one contiguous range of its cache row (continuous-static), that
range read in place by FlashAttention.

Why a module of its own: the step's attention is most of its GPU time (BENCHMARKS.md §3c: 8.0 of the
continuous-static step's 11.8 ms on an H100, the memory-efficient SDPA kernel at 333 us a layer), and
both static decoders switch the model to these functions for decoding only (`grouped_decoding`),
through transformers' attention registry.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import kernel_agrees

GROUPED = "pear_grouped_"  # prefix of the attention implementation the decoder switches to
RANGES = "pear_ranges_"  # the same, each row's mask one range of columns (continuous-static)
FLASH_MIN_BLOCKS = 1024  # rows x key/value heads from which flash_ranges beats SDPA (BENCHMARKS.md §3c)


def grouped_attention(original: Callable) -> Callable:
    """`original` (transformers' SDPA attention), except for one query token with grouped
    key/value heads: there a group's query heads become query rows of their key/value head,
    so the cache is read once per key/value head instead of copied to every query head."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        groups = getattr(module, "num_key_value_groups", 1)
        B, H, T, D = query.shape  # (B, H, 1, D) at a decoding step
        if T != 1 or groups == 1 or dropout or kw.get("softcap") is not None or kw.get("position_bias") is not None:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        q = query.reshape(B, H // groups, groups, D)  # (B, Hkv, G, D): head h = kv * G + g, as repeat_kv orders them
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, :, : key.shape[-2]]  # (B, 1 or H, 1, L)
            if mask.shape[1] != 1:
                mask = mask.reshape(B, H // groups, groups, -1)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # (B, Hkv, G, D)
        return out.reshape(B, 1, H, D), None  # (B, T, H, D), as the attention modules expect

    return attention


def flash_ranges(q, k, v, start, end, scale, kernel=None):
    """Attention of one query token per row over one contiguous range of its cache row, read in
    place: q (B, H, 1, D), k and v (B, KVH, L, D) (a static cache's layer), row b attends to the
    columns [start[b], end[b]). Out: (B, 1, H, D).

    Why: the memory-efficient SDPA kernel read the cache at about half the H100's bandwidth in the
    continuous-static step (BENCHMARKS.md §3c); FlashAttention-2's variable-length kernel reads each
    row's range once. It takes keys as (rows, KVH, D) with any row and head strides, so the cache is
    viewed as one long sequence of key rows (row stride D, head stride L * D), each cache row's range
    starting at its own offset (`cu_seqlens_k`) with its length given apart (`seqused_k`); a group's
    query heads are that row's query tokens (no causal mask), so a key/value head is read once for
    its group. `kernel`: `aten::_flash_attention_forward` by default (tests pass a stand-in)."""
    kernel = kernel or torch.ops.aten._flash_attention_forward
    B, H, _, D = q.shape
    KVH, L = k.shape[1], k.shape[2]
    G = H // KVH
    n = B * KVH * L - (KVH - 1) * L  # key rows addressable by a (n, KVH, D) view of head stride L * D
    kk = k.as_strided((n, KVH, D), (D, L * D, 1))
    vv = v.as_strided((n, KVH, D), (D, L * D, 1))
    first = torch.arange(B, device=q.device) * (KVH * L) + start  # (B,) each range's first key row
    cu_k = torch.cat([first, first[-1:] + (end - start)[-1:]]).to(torch.int32)
    cu_q = torch.arange(0, B * G + 1, G, device=q.device, dtype=torch.int32)
    qq = q.reshape(B, KVH, G, D).transpose(1, 2).reshape(B * G, KVH, D)  # (B * G, KVH, D): head h = kv * G + g
    out = kernel(qq, kk, vv, cu_q, cu_k, G, L, 0.0, False, False, scale=scale,
                 seqused_k=(end - start).to(torch.int32))[0]  # (B * G, KVH, D)
    return out.reshape(B, G, KVH, D).transpose(1, 2).reshape(B, 1, H, D)


@torch.library.custom_op("pear::flash_ranges", mutates_args=())
def flash_ranges_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """`flash_ranges` as one opaque operator: torch.compile keeps the in-place views of the cache and
    the kernel call as they are (eager inside the compiled step, recorded in its CUDA graph)."""
    return flash_ranges(q, k, v, start, end, scale).contiguous()


@flash_ranges_op.register_fake
def _(q, k, v, start, end, scale):
    B, H, _, D = q.shape
    return q.new_empty((B, 1, H, D))


def range_attention(original: Callable) -> Callable:
    """`grouped_attention(original)`, except for one query token on a cache of many rows, where each
    row's mask is one contiguous range of columns (continuous-static's layout: a row attends to its
    prompt and its new tokens): there `flash_ranges`. Fewer than FLASH_MIN_BLOCKS (rows x key/value
    heads) leave too little work for its one-block-per-range kernel and keep SDPA."""
    grouped = grouped_attention(original)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        B, H, T, D = query.shape
        if (T != 1 or attention_mask is None or attention_mask.dim() != 4 or B * key.shape[1] < FLASH_MIN_BLOCKS
                or dropout or kw.get("softcap") is not None or kw.get("position_bias") is not None):
            return grouped(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        m = attention_mask[:, 0, 0, : key.shape[-2]]  # (B, L)
        m = m if m.dtype == torch.bool else m == 0  # an additive mask: 0 where attended
        start = m.int().argmax(-1)  # (B,) the first attended column
        end = m.shape[-1] - m.flip(-1).int().argmax(-1)  # one past the last
        return flash_ranges_op(query, key, value, start, end, D ** -0.5 if scaling is None else float(scaling)), None

    return attention


@cache
def flash_decodes(device: str, dtype: torch.dtype) -> bool:
    """Whether `flash_ranges` runs here and agrees with SDPA on a small random cache (tried once per
    device and dtype: CPU, fp32 and torches whose operator lacks `seqused_k` keep SDPA)."""
    if not device.startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
        return False
    g = torch.Generator().manual_seed(0)
    B, KVH, G, L, D = 3, 2, 3, 40, 64
    q = torch.randn(B, KVH * G, 1, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, KVH, L, D, generator=g).to(device, dtype) for _ in range(2))
    start, end = torch.tensor([0, 5, 17], device=device), torch.tensor([40, 30, 18], device=device)
    cols = torch.arange(L, device=device)
    mask = (cols >= start[:, None]) & (cols < end[:, None])  # (B, L)
    return kernel_agrees(lambda: flash_ranges_op(q, k, v, start, end, D ** -0.5),
                         lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                                attn_mask=mask[:, None, None, :]).transpose(1, 2))


@contextlib.contextmanager
def grouped_decoding(model, ranges: bool = False):
    """Run `model` with `grouped_attention` while decoding (SDPA models only; others as they are);
    `ranges`: every row's mask is one contiguous range of columns, so `range_attention` where
    `flash_decodes` says FlashAttention takes it on the model's device and dtype."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..baselines.attention import register_attention

    original = model.config._attn_implementation
    if original != "sdpa":
        yield
        return
    weight = model.get_input_embeddings().weight
    if ranges and flash_decodes(str(weight.device), weight.dtype):
        name = register_attention(RANGES, lambda o: range_attention(ALL_ATTENTION_FUNCTIONS[o]), original)
    else:
        name = register_attention(GROUPED, lambda o: grouped_attention(ALL_ATTENTION_FUNCTIONS[o]), original)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
