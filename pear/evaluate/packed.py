"""A packed prefill for the decoding loops (`pear eval --prefill packed`).

Why: the eager loop (`generate.greedy_generate`) left-pads a batch's prompts and passes a padding
mask, and SDPA takes no FlashAttention kernel with a mask: profiled on an H100 (Qwen2.5-Coder-0.5B,
512 prompts of mdqa-10, bf16), prefill attention was 35 % of the GPU time, all of it in the
memory-efficient fallback, padded tokens included. Here the prompts of a batch go in as ONE row
without padding, position ids restarting at 0 for each prompt, and attention is variable-length
causal: FlashAttention's varlen kernel (`torch.nn.attention.varlen.varlen_attn`) on CUDA in 16 bits,
a loop of causal SDPA over the prompts elsewhere. No padded token is computed.

What comes out is what the padded prefill gives (up to rounding): each prompt's last logits and a
DynamicCache whose layers hold the keys and values left-padded to (B, KVH, T, D) (padding columns
zero: the mask hides them), with left_pad's mask and positions, so the eager loop goes on unchanged.

The attention function reaches the model through transformers' attention interface: registered as
"pear_packed" and switched on for the prefill call only. The prompts' boundaries reach it through a
context variable, not through the forward's keyword arguments, which not every model passes on.

`--prefill compiled` is the packed prefill with the decoder blocks compiled (`compiled_prefill`).
"""

from __future__ import annotations

import inspect
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..errors import PearError
from .generate import greedy_generate, left_pad

NAME = "pear_packed"


@dataclass(frozen=True)
class Segments:
    """The prompts of the packed row: cu (B+1,) int32 offsets on the device, the same as Python
    ints (for the loop over prompts), the longest prompt, and whether FlashAttention takes the
    model's grouped key/value heads as they are (`flash_takes_groups`)."""

    cu: torch.Tensor
    starts: tuple[int, ...]
    longest: int
    grouped: bool = False


_SEGMENTS: ContextVar[Segments | None] = ContextVar("pear_packed_segments", default=None)


def supports_packed(lm) -> bool:
    """A plain transformers model (not a variant's wrapper) on one device, every layer full
    attention, no logit softcapping, its attention dispatched through transformers' interface."""
    from transformers import PreTrainedModel

    from .continuous import supports_continuous

    if not isinstance(lm, PreTrainedModel) or not supports_continuous(lm):
        return False
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(cfg, "attn_logit_softcapping", None) or not getattr(cfg, "is_causal", True):
        return False
    can_set = getattr(type(lm), "_can_set_attn_implementation", None)  # transformers' own test of the dispatch
    return bool(can_set is not None and can_set())


def _kernel(query: torch.Tensor):
    """The varlen FlashAttention function for this query (CUDA, 16 bits: FlashAttention takes no
    fp32), or None: then a loop over the prompts."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@cache
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _varlen(fn, q, k, v, seg: Segments, scale):
    """fn = varlen_attn on q (N, H, D), k and v (N, KVH, D), causal within each prompt; its
    arguments differ across torch versions: window_size=(-1, 0) (>= 2.11) or is_causal=True
    (2.10) for causal, enable_gqa (>= 2.12) or else key/value heads repeated for grouped
    queries, scale (>= 2.11) or else the query scaled so that the kernel's 1/sqrt(D) makes it."""
    params, kw = _parameters(fn), {}
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        elif seg.grouped:
            return flash_grouped(q, k, v, seg, scale)
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return fn(q, k, v, seg.cu, seg.cu, seg.longest, seg.longest, **kw)  # (N, H, D)


def flash_grouped(q, k, v, seg: Segments, scale):
    """Causal variable-length FlashAttention with fewer key/value heads than query heads, q (N, H, D),
    k and v (N, KVH, D): the ATen operator that varlen_attn(enable_gqa=True) calls in torch >= 2.12.

    Why: a torch whose varlen_attn takes no `enable_gqa` (2.10, 2.11) needs the key/value heads
    repeated to every query head, and that copy was 20 % of the compiled prefill's GPU time
    (Qwen2.5-Coder-0.5B, 1 x H200: 2 heads written out as 14); FlashAttention-2 reads each key/value
    head for its group of query heads itself."""
    return torch.ops.aten._flash_attention_forward(q, k, v, seg.cu, seg.cu, seg.longest, seg.longest, 0.0, True,
                                                   False, scale=scale)[0]


@cache
def flash_takes_groups(device: str, dtype: torch.dtype) -> bool:
    """Whether `flash_grouped` runs here and agrees with the kernel on repeated heads: tried once per
    device and dtype on a small random input (an older operator that refuses grouped heads, or a torch
    without it, keeps the repeated heads)."""
    fn = _kernel(torch.empty(1, device=device, dtype=dtype))
    if fn is None or "enable_gqa" in _parameters(fn):
        return False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, h, 64, generator=g).to(device, dtype) for h in (4, 2, 2))  # two prompts, two groups
    seg = Segments(torch.tensor([0, 9, 24], dtype=torch.int32, device=device), (0, 9, 24), 15)
    try:
        got = flash_grouped(q, k, v, seg, 0.125)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False
    ref = _varlen(fn, q, k, v, seg, 0.125)  # seg.grouped is False: the heads repeated
    return bool(torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=0))


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query (1, H, N, D), key/value (1, KVH, N, D) in,
    (output (1, N, H, D), None) out; causal within each prompt of the packed row."""
    seg = _SEGMENTS.get()
    if seg is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise RuntimeError("pear_packed attention runs only inside packed_prefill")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise RuntimeError("pear_packed attention takes full attention without softcapping")
    fn = _kernel(query)
    if fn is not None:
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (N, H or KVH, D)
        return _varlen(fn, q, k, v, seg, scaling)[None], None  # (1, N, H, D)
    gqa = key.shape[1] != query.shape[1]
    out = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                          scale=scaling, enable_gqa=gqa)  # (1, H, L, D)
           for a, b in zip(seg.starts[:-1], seg.starts[1:])]
    return torch.cat(out, dim=2).transpose(1, 2), None  # (1, N, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, lambda *a, **kw: None)  # no mask: the segments say it all


def _attn_implementations(lm) -> list[tuple[object, str | None]]:
    """(config, attention implementation) of the model and its submodels: put back as they were
    after the prefill (set_attn_implementation back to the old name would check it again, and
    look a hub kernel up again)."""
    from transformers import PreTrainedModel

    configs = {id(m.config): m.config for m in lm.modules() if isinstance(m, PreTrainedModel)}
    return [(c, c._attn_implementation_internal) for c in configs.values()]


@torch.no_grad()
def packed_prefill(lm, rows: list[list[int]], pad_id: int, device):
    """The prompts `rows` packed into one row: (last logits (B, V), DynamicCache of left-padded
    (B, KVH, T, D) layers, mask (B, T), positions (B, T)), as the padded prefill returns them."""
    _register()
    n = torch.tensor([len(r) for r in rows])  # (B,) prompt lengths
    B, T = len(rows), int(n.max())
    cu = torch.cat([n.new_zeros(1), n.cumsum(0)])  # (B+1,) where each prompt starts in the row
    row = torch.repeat_interleave(torch.arange(B), n)  # (N,) each packed token's prompt
    pos = torch.arange(int(cu[-1])) - cu[row]  # (N,) from 0 in each prompt
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)  # (N,)
    dtype = next(lm.parameters()).dtype
    seg = Segments(cu.to(device, torch.int32), tuple(cu.tolist()), T, flash_takes_groups(str(device), dtype))
    saved = _attn_implementations(lm)
    token = _SEGMENTS.set(seg)
    try:
        lm.set_attn_implementation(NAME)
        if lm.config._attn_implementation != NAME:
            raise PearError(f"{type(lm).__name__} cannot switch its attention to the packed prefill's")
        out = lm(input_ids=ids[None].to(device), position_ids=pos[None].to(device), attention_mask=None,
                 use_cache=True, logits_to_keep=(cu[1:] - 1).to(device))  # logits (1, B, V): each last token
    finally:
        _SEGMENTS.reset(token)
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
    row, col = row.to(device), (pos + (T - n)[row]).to(device)  # (N,) each: its place, left-padded
    past = out.past_key_values
    for layer in past.layers:
        for name in ("keys", "values"):
            packed = getattr(layer, name)  # (1, KVH, N, D)
            padded = packed.new_zeros(B, packed.shape[1], T, packed.shape[3])  # (B, KVH, T, D)
            padded[row, :, col] = packed[0].transpose(0, 1)  # (N, KVH, D) into their places
            setattr(layer, name, padded)
    _, mask, positions = left_pad(rows, pad_id, device)
    return out.logits[0], past, mask, positions  # logits (B, V)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its compiled blocks


def compiled_prefill(lm, rows: list[list[int]], pad_id: int, device):
    """`packed_prefill` with every decoder block compiled (torch.compile, symbolic shapes).

    Why: profiled on an H200 (Qwen2.5-Coder-0.5B, 512 prompts of mdqa-10, bf16), the packed prefill left
    34 % of its GPU time in normalisation, activations, rotations and residual adds, one kernel each in
    eager mode; compiled, they fuse around the attention call, which stays eager (the graph breaks where
    the segments are read from their context variable). The blocks are compiled at the first call and
    swapped into the model for the prefill alone, so decoding, and everything else, runs the model as it
    was. Each block's graph is specialised on its layer index (it picks its layer of the cache), so the
    blocks need as many compilations: dynamo's recompile limit (8 by default) is raised to twice the number
    of blocks for the prefill (under the default, the blocks past the eighth ran uncompiled: measured on an
    H100)."""
    from ..families import resolve

    blocks = lm.get_submodule(resolve(lm).family.blocks)  # the ModuleList of decoder blocks
    if lm not in _COMPILED:
        _COMPILED[lm] = [torch.compile(b, dynamic=True) for b in blocks]
    originals = list(blocks)
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    try:
        for i, c in enumerate(_COMPILED[lm]):
            blocks[i] = c
        with torch._dynamo.config.patch(recompile_limit=limit):
            return packed_prefill(lm, rows, pad_id, device)
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


PREFILLS = {"packed": packed_prefill, "compiled": compiled_prefill}  # --prefill: the prompts in one row


class PackedDecoder:
    """`--prefill packed` (or `compiled`) with the eager loop, for the harness: `generate` has
    `greedy_generate`'s contract."""

    decode = "eager"

    def __init__(self, prefill: str = "packed"):
        self.prefill = self.name = prefill  # name: in the results' part keys

    def generate(self, lm, prompts, **kw) -> list[list[int]]:
        if not supports_packed(lm):
            raise PearError(f"--prefill {self.prefill} takes plain transformers models with full attention in every "
                            f"layer; {type(lm).__name__} is not one (use --prefill padded)")
        return greedy_generate(lm, prompts, prefill=PREFILLS[self.prefill], **kw)
