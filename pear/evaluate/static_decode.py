"""Greedy decoding on a static KV cache with a compiled one-token step (`pear eval --decode static`).

Why: the eager loop (`generate.greedy_generate`) launches every kernel of every layer from
Python at each step, about 35 ms per step at 512 rows for SmolLM2-135M on an H200, far more
than the GPU work. Here the KV cache is preallocated (transformers' `StaticCache`), so the
one-token step always has the same shapes, and `model.get_compiled_call` (the torch.compile
wrapper `generate` uses; inductor, mode "reduce-overhead") replays it as CUDA graphs.

The same answers as the eager loop: the same batches, left padding, position ids and stopping
rules (EOS, the token budget, `done`). What differs:
* Finished rows stay in the batch, fed padding: dropping them would change the shapes.
* Attention runs over the whole preallocated cache (its length rounded up to CACHE_BUCKET,
  so batches of similar length share one compiled step), the unfilled positions masked.
  Masked keys weigh exactly 0, but longer reductions may round differently: in 16-bit a
  near-tie can flip a greedy token. benchmarks/decode_throughput.py counts such answers.
* The prompt (prefill) runs eagerly; only the step is compiled. On CPU nothing is compiled
  by default (`compile=None`): the static cache alone, which gains nothing there.
Only plain transformers models take this path: a variant (pear.baselines) owns its cache.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import PearError
from .generate import decode_batches, left_pad, take_tokens

CACHE_BUCKET = 128  # cache lengths are multiples of this: fewer shapes, fewer compilations


def supports_static(lm) -> bool:
    """A plain transformers model whose family can run on a static cache under torch.compile,
    on one device (a `--device-map` split keeps the eager loop, as `generate` does)."""
    from transformers import PreTrainedModel

    on_one = len(set((getattr(lm, "hf_device_map", None) or {0: 0}).values())) == 1
    return isinstance(lm, PreTrainedModel) and bool(getattr(lm, "_can_compile_fullgraph", False)) and on_one


class StaticDecoder:
    """One model's decoding step (compiled or not) and its preallocated cache, which is reset
    and reused while the batch shape repeats (a new cache object would make a new graph).

    compile: None = on CUDA only; backend / mode: torch.compile's (tests use backend "eager")."""

    def __init__(self, model, compile: bool | None = None, backend: str = "inductor",
                 mode: str | None = "reduce-overhead"):
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
                self.step = model.get_compiled_call(CompileConfig(backend=backend, mode=mode))
            except Exception as e:  # an unknown backend, a torch without a compiler
                raise _compile_error(e) from e
        self.cache, self.shape = None, None

    def cache_for(self, rows: int, length: int):
        from transformers import StaticCache

        if self.shape == (rows, length):
            self.cache.reset()
        else:
            self.cache = None  # free the old one first: it may be most of the memory
            self.cache = StaticCache(config=self.model.config, max_cache_len=length)
            self.shape = (rows, length)
        return self.cache

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
        rows = list(batch)
        ids, mask, pos = left_pad([prompts[i] for i in batch], pad_id, device)  # (B, T)
        B, T = ids.shape
        length = -(-(T + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        cache = dec.cache_for(B, length)
        full = torch.zeros((B, length), dtype=mask.dtype, device=device)  # the mask over the whole cache
        full[:, :T] = mask
        logits = model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # prefill, eager: (B, V)
        pos = pos[:, -1:]
        fin = [False] * B
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            take_tokens(nxt, eos, rows, fin, out, done)
            if all(fin) or step == max_new_tokens - 1:
                break
            nxt = nxt.masked_fill(torch.tensor(fin, device=device), pad_id)  # finished rows: padding
            full[:, T + step] = 1
            pos = pos + 1
            logits = dec(input_ids=nxt[:, None], attention_mask=full, position_ids=pos, past_key_values=cache,
                         use_cache=True)

    decode_batches(run, prompts, batches, batch_size, max_batch_tokens, max_new_tokens, on_batch)
    return out
