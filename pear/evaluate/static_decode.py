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
  reads the whole cache 7 times per step. `step_attention.grouped_attention` lays a group's query
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

from typing import Callable

import torch

from ..errors import PearError
from .generate import decode_batches, left_pad, take_tokens
from .step_attention import grouped_decoding

CACHE_BUCKET = 128  # cache lengths are multiples of this: fewer shapes, fewer compilations
MIN_ROWS = 8  # the smallest row bucket


def supports_static(lm) -> bool:
    """A plain transformers model whose family can run on a static cache under torch.compile,
    on one device (a `--device-map` split keeps the eager loop, as `generate` does)."""
    from transformers import PreTrainedModel

    from ..hardware import on_one_device

    return isinstance(lm, PreTrainedModel) and bool(getattr(lm, "_can_compile_fullgraph", False)) and on_one_device(lm)


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
