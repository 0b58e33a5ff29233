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
`--prefill packed-shared` / `compiled-shared` compute a prefix that prompts of the batch share once
(`shared_prefixes`): lost-in-the-middle tasks ask each question with its gold document at several
positions, and those prompts agree up to the first moved document.
"""

from __future__ import annotations

import inspect
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, partial
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import kernel_agrees
from ..errors import PearError
from .generate import greedy_generate


NAME = "pear_packed"
SHARE_WINDOW = 8  # a prompt's shared prefix is looked for among the prompts just before it (see shared_prefixes)


@dataclass(frozen=True)
class Segments:
    """The prompts of the packed row: cu (B+1,) int32 offsets of their tokens in the row on the
    device, the same as Python ints (for the loop over prompts), the longest prompt, and whether
    FlashAttention takes the model's grouped key/value heads as they are (`flash_takes_groups`).

    With shared prefixes a prompt's row holds only its own tokens (its queries), while it attends to
    its whole prompt: `keys` (N_k,) picks each prompt's keys from the row (its shared prefix from the
    prompt it shares it with, then its own tokens), `cu_k`, `starts_k`, `longest_k` count them."""

    cu: torch.Tensor
    starts: tuple[int, ...]
    longest: int
    grouped: bool = False
    keys: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    starts_k: tuple[int, ...] | None = None
    longest_k: int | None = None

    def key_segments(self) -> tuple[torch.Tensor, tuple[int, ...], int]:
        """(cu, starts, longest) of the keys: the queries' own without shared prefixes."""
        if self.keys is None:
            return self.cu, self.starts, self.longest
        return self.cu_k, self.starts_k, self.longest_k


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
    cu_k, _, longest_k = seg.key_segments()
    return fn(q, k, v, seg.cu, cu_k, seg.longest, longest_k, **kw)  # (N, H, D)


def flash_grouped(q, k, v, seg: Segments, scale):
    """Causal variable-length FlashAttention with fewer key/value heads than query heads, q (N, H, D),
    k and v (N, KVH, D): the ATen operator that varlen_attn(enable_gqa=True) calls in torch >= 2.12.

    Why: a torch whose varlen_attn takes no `enable_gqa` (2.10, 2.11) needs the key/value heads
    repeated to every query head, and that copy was 20 % of the compiled prefill's GPU time
    (Qwen2.5-Coder-0.5B, 1 x H200: 2 heads written out as 14); FlashAttention-2 reads each key/value
    head for its group of query heads itself."""
    cu_k, _, longest_k = seg.key_segments()
    return torch.ops.aten._flash_attention_forward(q, k, v, seg.cu, cu_k, seg.longest, longest_k, 0.0, True,
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
    return kernel_agrees(lambda: flash_grouped(q, k, v, seg, 0.125),
                         lambda: _varlen(fn, q, k, v, seg, 0.125))  # seg.grouped is False: the heads repeated


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query (1, H, N, D), key/value (1, KVH, N, D) in,
    (output (1, N, H, D), None) out; causal within each prompt of the packed row."""
    seg = _SEGMENTS.get()
    if seg is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise RuntimeError("pear_packed attention runs only inside packed_prefill")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise RuntimeError("pear_packed attention takes full attention without softcapping")
    if seg.keys is not None:  # each prompt's keys: its shared prefix (another prompt's tokens), then its own
        key, value = key[:, :, seg.keys], value[:, :, seg.keys]  # (1, KVH, N_k, D)
    fn = _kernel(query)
    if fn is not None:
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (N, H or KVH, D)
        return _varlen(fn, q, k, v, seg, scaling)[None], None  # (1, N, H, D)
    return _loop(query, key, value, seg, scaling).transpose(1, 2), None  # (1, N, H, D)


def _loop(query, key, value, seg: Segments, scale):
    """Causal SDPA prompt by prompt, query (1, H, N, D), key/value (1, KVH, N_k, D) -> (1, H, N, D):
    a prompt whose first keys are a shared prefix has fewer queries than keys, its last query
    aligned with its last key (FlashAttention's causal alignment, from the bottom right)."""
    _, starts_k, _ = seg.key_segments()
    gqa, out = key.shape[1] != query.shape[1], []
    for a, b, c, d in zip(seg.starts[:-1], seg.starts[1:], starts_k[:-1], starts_k[1:]):
        kw = dict(is_causal=True) if b - a == d - c else \
            dict(attn_mask=torch.ones(b - a, d - c, dtype=torch.bool, device=query.device).tril(d - c - (b - a)))
        out.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, c:d], value[:, :, c:d], scale=scale,
                                                  enable_gqa=gqa, **kw))  # (1, H, L, D)
    return torch.cat(out, dim=2)


def shared_prefixes(rows: list[list[int]], window: int = SHARE_WINDOW) -> tuple[list[int], list[int]]:
    """For each prompt, how many of its first tokens one of the `window` prompts before it already
    holds (the most of them; the nearest such prompt), and which prompt that is (-1: none); at most
    its length - 1, so that every prompt computes its last token (its logits).

    Why a window, not a trie of the whole batch: the harness sorts prompts by length, and the
    variants of one question (gold at several positions, the same documents) have the same length,
    so they sit together; comparing each prompt with a few neighbours, all prompts at once (numpy),
    costs ~15 ms per 500 prompts of mdqa-10 on 2 CPU cores, where a token trie in Python costs ~0.5 s."""
    n = np.array([len(r) for r in rows])  # (B,)
    tokens = np.full((len(rows), int(n.max(initial=0)) + 1), -1)  # (B, L + 1): -1 after each prompt
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    best, source = np.zeros(len(rows), dtype=np.int64), np.full(len(rows), -1)
    for w in range(1, min(window, len(rows) - 1) + 1):  # prompt i against prompt i - w
        differ = tokens[w:] != tokens[:-w]  # (B - w, L + 1)
        common = np.where(differ.any(1), differ.argmax(1), tokens.shape[1])  # (B - w,) first difference
        common = np.minimum(common, np.minimum(n[w:] - 1, n[:-w]))
        better = common > best[w:]
        best[w:] = np.where(better, common, best[w:])
        source[w:] = np.where(better, np.arange(len(rows) - w), source[w:])
    return best.tolist(), source.tolist()


@cache
def flash_shares_prefixes(device: str, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel here aligns a causal prompt with fewer queries than keys from the
    bottom right, as `_loop` does (tried once per device and dtype; the loop itself always does)."""
    fn = _kernel(torch.empty(1, device=device, dtype=dtype))
    if fn is None:
        return True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 64, generator=g).to(device, dtype) for n, h in ((19, 4), (24, 2), (24, 2)))
    seg = Segments(torch.tensor([0, 4, 19], dtype=torch.int32, device=device), (0, 4, 19), 15,
                   flash_takes_groups(device, dtype), torch.arange(24, device=device),
                   torch.tensor([0, 9, 24], dtype=torch.int32, device=device), (0, 9, 24), 15)  # 4 of 9, 15 of 15
    loop = lambda: _loop(*(x.float().transpose(0, 1)[None] for x in (q, k, v)), seg, 0.125)[0]  # noqa: E731
    return kernel_agrees(lambda: _varlen(fn, q, k, v, seg, 0.125), lambda: loop().transpose(0, 1))  # (19, 4, 64)


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
def packed_prefill(lm, rows: list[list[int]], pad_id: int, device, share: bool = False):
    """The prompts `rows` packed into one row: (last logits (B, V), DynamicCache of left-padded
    (B, KVH, T, D) layers, mask (B, T), positions (B, T)), as the padded prefill returns them.
    `share`: a prompt's prefix that a prompt before it holds (`shared_prefixes`) is not computed again.
    `pad_id`: the padded prefill's argument, unused (the padding columns of the cache are zeros)."""
    _register()
    dtype = next(lm.parameters()).dtype
    n = torch.tensor([len(r) for r in rows])  # (B,) prompt lengths
    B, T = len(rows), int(n.max())
    s = [0] * B
    if share and flash_shares_prefixes(str(device), dtype):
        s, source = shared_prefixes(rows)
    own = n - torch.tensor(s)  # (B,) the tokens each prompt computes
    cu = torch.cat([n.new_zeros(1), own.cumsum(0)])  # (B+1,) where each prompt's own tokens start in the row
    ids = torch.tensor(list(chain.from_iterable(r[k:] for r, k in zip(rows, s))), dtype=torch.long)  # (N,)
    pos = torch.cat([torch.arange(k, len(r)) for r, k in zip(rows, s)])  # (N,) their positions in their prompts
    cu_k = torch.cat([n.new_zeros(1), n.cumsum(0)])  # (B+1,) the same for every token of every prompt
    keys = None  # (N_k,) for each token of each prompt, its place in the row
    if any(s):
        mine = [np.arange(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        for i in range(B):
            if s[i]:
                mine[i] = np.concatenate([mine[source[i]][: s[i]], mine[i]])
        keys = torch.from_numpy(np.concatenate(mine)).to(device)
    seg = Segments(cu.to(device, torch.int32), tuple(cu.tolist()), int(own.max()),
                   flash_takes_groups(str(device), dtype), keys, cu_k.to(device, torch.int32), tuple(cu_k.tolist()), T)
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
    row = torch.repeat_interleave(torch.arange(B), n)  # (N_k,) each prompt token's prompt
    col = (torch.arange(int(cu_k[-1])) - cu_k[row] + (T - n)[row]).to(device)  # (N_k,) its column, left-padded
    row = row.to(device)
    past = out.past_key_values
    for layer in past.layers:
        for name in ("keys", "values"):
            packed = getattr(layer, name)[0].transpose(0, 1)  # (N, KVH, D)
            padded = packed.new_zeros(B, packed.shape[1], T, packed.shape[2])  # (B, KVH, T, D)
            padded[row, :, col] = packed if keys is None else packed[keys]  # (N_k, KVH, D) into their places
            setattr(layer, name, padded)
    mask = (torch.arange(T) >= (T - n)[:, None]).long()  # (B, T): left_pad's, from the lengths alone
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return out.logits[0], past, mask.to(device), positions.to(device)  # logits (B, V)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its compiled blocks


def compiled_prefill(lm, rows: list[list[int]], pad_id: int, device, share: bool = False):
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
            return packed_prefill(lm, rows, pad_id, device, share)
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


PREFILLS = {"packed": packed_prefill, "compiled": compiled_prefill,  # --prefill: the prompts in one row
            "packed-shared": partial(packed_prefill, share=True),
            "compiled-shared": partial(compiled_prefill, share=True)}


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
