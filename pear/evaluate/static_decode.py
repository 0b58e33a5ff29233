"""Greedy decoding on a static KV cache with a compiled one-token step (`pear eval --decode static`).

Why: the eager loop (`generate.greedy_generate`) launches every kernel of every layer from
Python at each step, about 35 ms per step at 512 rows for SmolLM2-135M on an H200, far more
than the GPU work. Here the KV cache is preallocated (transformers' `StaticCache`), so the
one-token step always has the same shapes, and `model.get_compiled_call` (the torch.compile
wrapper `generate` uses; inductor, mode "reduce-overhead") replays it as CUDA graphs.

Two things keep the compiled step from costing more per row than the eager one (without
them this path was slower than eager; BENCHMARKS.md §3c):
* Grouped-query attention without copies. Under torch.compile transformers' SDPA path
  repeats the key/value heads to every query head (`repeat_kv`): for Qwen2.5 that writes and
  reads the whole cache 7 times per step. `grouped_attention` instead lays a group's query
  heads out as query rows of its key/value head, the same arithmetic with no copy.
* Compaction into row buckets. Answers are short but a few run to the token budget; the
  eager loop drops finished rows, and so does this one, by moving the rows still running to
  a cache of the next power-of-two row count once half the rows have finished. Each bucket
  is one more compiled shape, not one per row count.

The same answers as the eager loop: the same batches, left padding, position ids and stopping
rules (EOS, the token budget, `done`). What differs: attention runs over the whole
preallocated cache (its length rounded up to CACHE_BUCKET, so batches of similar length share
a compiled step), the unfilled positions masked. Masked keys weigh exactly 0, but longer
reductions and fused kernels round differently: in 16-bit a near-tie can flip a greedy token.
benchmarks/decode_throughput.py counts such answers. The prompt (prefill) runs eagerly; only
the step is compiled. On CPU nothing is compiled by default (`compile=None`).
Only plain transformers models take this path: a variant (pear.baselines) owns its cache.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import PearError
from .generate import decode_batches, left_pad, take_tokens

CACHE_BUCKET = 128  # cache lengths are multiples of this: fewer shapes, fewer compilations
MIN_ROWS = 8  # the smallest row bucket
GROUPED = "pear_grouped_"  # prefix of the attention implementation the decoder switches to
RANGES = "pear_ranges_"  # the same, each row's mask one range of columns (continuous-static)
FLASH_MIN_BLOCKS = 1024  # rows x key/value heads from which flash_ranges beats SDPA (BENCHMARKS.md §3c)


def supports_static(lm) -> bool:
    """A plain transformers model whose family can run on a static cache under torch.compile,
    on one device (a `--device-map` split keeps the eager loop, as `generate` does)."""
    from transformers import PreTrainedModel

    from ..hardware import on_one_device

    return isinstance(lm, PreTrainedModel) and bool(getattr(lm, "_can_compile_fullgraph", False)) and on_one_device(lm)


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
    try:
        got = flash_ranges_op(q, k, v, start, end, D ** -0.5)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                         attn_mask=mask[:, None, None, :]).transpose(1, 2)
    return bool(torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=0))


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


class StaticDecoder:
    """One model's decoding step (compiled or not) and its preallocated caches, one per row
    bucket of the batch being decoded. They are reset and reused while batches repeat the
    same shape (a new cache object means new CUDA graphs).

    compile: None = on CUDA only; backend / mode: torch.compile's (tests use backend "eager");
    dynamic: torch.compile's (None: compile for the first shapes, then again with the sizes
    that changed as symbols; True: symbolic from the start, one compilation)."""

    name = "static"  # in the results' part keys
    decode, prefill = "static", "padded"

    def __init__(self, model, compile: bool | None = None, backend: str = "inductor",
                 mode: str | None = "reduce-overhead", dynamic: bool | None = None):
        if not supports_static(model):
            raise PearError(f"--decode static needs a transformers model whose family compiles with a static cache; "
                            f"{type(model).__name__} does not (use --decode eager)")
        from transformers import CompileConfig

        self.model = model
        device = model.get_input_embeddings().weight.device
        self.compiled = device.type == "cuda" if compile is None else bool(compile)
        self.step = model
        if self.compiled:
            try:
                self.step = model.get_compiled_call(CompileConfig(backend=backend, mode=mode, dynamic=dynamic))
            except Exception as e:  # an unknown backend, a torch without a compiler
                raise _compile_error(e) from e
        self.caches, self.start = {}, None  # {(rows, length): StaticCache}, the batch shape they belong to

    def generate(self, model, prompts, **kw) -> list[list[int]]:
        """`generate.greedy_generate`'s contract, on this decoder's static caches."""
        return static_generate(model, prompts, decoder=self, **kw)

    def begin(self, rows: int, length: int):
        """The cache for a new batch's prompt; the bucket caches of an earlier batch of another
        shape are freed first (they may be most of the memory)."""
        if self.start != (rows, length):
            self.caches, self.start = {}, (rows, length)
        return self.cache_for(rows, length)

    def cache_for(self, rows: int, length: int):
        from transformers import StaticCache

        cache = self.caches.get((rows, length))
        if cache is None:
            cache = self.caches[(rows, length)] = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        return cache

    def __call__(self, **kw) -> torch.Tensor:
        """One decoding step: the next-token logits (B, V)."""
        if not self.compiled:
            return self.model(**kw, logits_to_keep=1).logits[:, -1]
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read: its graph may be reused
        try:
            return self.step(**kw, logits_to_keep=1).logits[:, -1]
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # inductor, triton or a graph the model cannot be compiled into
            raise _compile_error(e) from e


def _compile_error(e: Exception) -> PearError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return PearError(f"--decode static: torch.compile of the decoding step failed ({type(e).__name__}: {first}); "
                     "use --decode eager")


def bucket(live: int) -> int:
    """The row count a batch with `live` running rows is decoded at: a power of two."""
    return max(MIN_ROWS, 1 << (live - 1).bit_length())


def move_rows(src, dst, sel: torch.Tensor, rows: int) -> None:
    """Copy the cache rows `sel` of `src` into the first rows of `dst` (reset, `rows` rows, same
    length), in place: the compiled step reads `dst` at fixed addresses. Its other rows stay 0."""
    n = len(sel)
    for a, b in zip(src.layers, dst.layers):
        if not a.is_initialized:
            continue
        if not b.is_initialized:
            b.lazy_initialization(a.keys.new_empty((rows, a.keys.shape[1], 1, a.keys.shape[-1])),
                                  a.values.new_empty((rows, a.values.shape[1], 1, a.values.shape[-1])))
        b.keys[:n] = a.keys.index_select(0, sel)
        b.values[:n] = a.values.index_select(0, sel)
        b.cumulative_length.copy_(a.cumulative_length)
        if hasattr(a, "cumulative_length_int"):  # sliding-window layers also count in Python
            b.cumulative_length_int = a.cumulative_length_int


@torch.no_grad()
def static_generate(model, prompts: list[list[int]], *, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                    device, batch_size: int = 8, max_batch_tokens: int = 32768,
                    done: Callable[[int, list[int]], bool] | None = None,
                    on_batch: Callable[[int], None] | None = None, batches: list[list[int]] | None = None,
                    decoder: StaticDecoder | None = None) -> list[list[int]]:
    """`generate.greedy_generate`'s contract and outputs, decoded on a static cache by
    `decoder` (default: a StaticDecoder of `model`, compiled on CUDA)."""
    dec = decoder or StaticDecoder(model)
    out: list[list[int]] = [[] for _ in prompts]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

    def run(batch: list[int]) -> None:
        for i in batch:
            out[i] = []
        rows = list(batch)  # example index of each row; -1: an empty row of a bucket
        ids, mask, pos = left_pad([prompts[i] for i in batch], pad_id, device)  # (B, T)
        B, T = ids.shape
        length = -(-(T + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        cache = dec.begin(B, length)
        full = torch.zeros((B, length), dtype=mask.dtype, device=device)  # the mask over the whole cache
        full[:, :T] = mask
        logits = model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # prefill, eager: (B, V)
        pos = pos[:, -1:]  # (B, 1)
        fin = [False] * B
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            take_tokens(nxt, eos, rows, fin, out, done)
            if all(fin) or step == max_new_tokens - 1:
                break
            live = [r for r, f in enumerate(fin) if not f]
            if bucket(len(live)) <= len(rows) // 2:  # half the rows or more finished: a smaller bucket
                rows_b = bucket(len(live))
                sel = torch.tensor(live, dtype=torch.long, device=device)
                small = dec.cache_for(rows_b, length)
                move_rows(cache, small, sel, rows_b)
                cache, n = small, len(live)
                full = _take(full, sel, rows_b, 0)
                full[n:, 0] = 1  # empty rows attend to one (zero) key: no all-masked row
                pos, nxt = _take(pos, sel, rows_b, 0), _take(nxt, sel, rows_b, pad_id)
                rows = [rows[r] for r in live] + [-1] * (rows_b - n)
                fin = [False] * n + [True] * (rows_b - n)
            nxt = nxt.masked_fill(torch.tensor(fin, device=device), pad_id)  # finished rows: padding
            full[:, T + step] = 1
            pos = pos + 1
            logits = dec(input_ids=nxt[:, None], attention_mask=full, position_ids=pos, past_key_values=cache,
                         use_cache=True)

    with grouped_decoding(model):
        decode_batches(run, prompts, batches, batch_size, max_batch_tokens, max_new_tokens, on_batch)
    return out


def _take(x: torch.Tensor, sel: torch.Tensor, rows: int, fill) -> torch.Tensor:
    """The rows `sel` of `x`, then `fill` up to `rows` rows."""
    y = x.new_full((rows,) + tuple(x.shape[1:]), fill)
    y[: len(sel)] = x.index_select(0, sel)
    return y
