"""Greedy decoding with continuous batching (`pear eval --decode continuous`).

Why: a batch of the eager loop (`generate.greedy_generate`) runs until its longest answer ends.
Answers are short (median 19 new tokens on mdqa-10) but 3-4 % run to the 100-token budget, so
nearly every batch decodes the whole budget, most steps with few rows left: in SmolLM2-135M's
full mdqa-10 run at 64-row batches a step carried 11.5 rows on average. A step costs about the
same whatever its rows (decoding is launch-bound on a GPU), so here the rows that finish make
room for the next prompts: once a quarter of the rows are free, the waiting prompts are
prefilled together and their caches joined to the running ones, every row left-padded to a
common length. A plain transformers cache holds keys already rotated, each row at its own
position ids, so padding on the left changes nothing a row attends to; columns that no row
attends to any longer are cut from the left.

The joining prompts are prefilled left-padded, or packed into one row (`--prefill packed`,
`packed.packed_prefill`), which hands back the same left-padded cache.

The same stopping rules as the eager loop (EOS, the token budget, `done`); what differs is which
rows share a forward pass, so 16-bit outputs can differ as they do under any other batching (in
fp32 the tokens are the eager loop's: tests). Only models whose layers keep their whole cache
take this path (a sliding-window layer keeps only its last tokens, which a join would misalign):
plain transformers models, and a variant (pear.baselines) that joins and cuts the state it keeps
beside the model's cache (`join_cache_state`, `trim_cache_state`: MoICE).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import attention_backends
from ..errors import PearError
from .generate import Forward, decode_step, prefiller, select_cache_rows, take_tokens

JOIN_WHEN_FREE = 4  # prompts join once 1/4 of the rows are free (each join copies the cache once)


def supports_continuous(lm) -> bool:
    """A transformers model on one device whose every layer keeps its whole cache, plain or under
    a variant that joins and cuts its own cache state."""
    from transformers import PreTrainedModel

    from ..hardware import on_one_device

    if all(hasattr(type(lm), f) for f in ("join_cache_state", "trim_cache_state")):
        lm = lm.model
    if not isinstance(lm, PreTrainedModel) or not on_one_device(lm):
        return False
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    types = getattr(cfg, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True))


class ContinuousDecoder:
    """`--decode continuous` for the harness: `generate` has `greedy_generate`'s contract.
    prefill: how the joining prompts are read, as `--prefill` names it: "padded" (left-padded), or
    "packed" / "compiled" (in one row: `packed.PREFILLS`)."""

    decode = "continuous"

    def __init__(self, prefill: str = "padded"):
        from .packed import PREFILLS

        self.prefill = prefill
        self.prefill_fn = PREFILLS.get(prefill)  # None: padded

    @property
    def name(self) -> str:  # in the results' part keys
        return "continuous" if self.prefill == "padded" else f"continuous+{self.prefill}"

    def generate(self, lm, prompts, **kw) -> list[list[int]]:
        return continuous_generate(lm, prompts, prefill=self.prefill_fn, **kw)


def _layers(past) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(past, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        raise PearError("--decode continuous needs a cache of full-attention layers (transformers' DynamicCache); "
                        "use --decode eager")
    return layers


def _join(lm, past, new, pad_old: int, pad_new: int) -> None:
    """Append the rows of cache `new` to `past`, in place, left-padding each to a common length
    (and a variant's state kept with the cache)."""
    for a, b in zip(_layers(past), _layers(new)):  # keys and values (B, KVH, L, D)
        a.keys = torch.cat([F.pad(a.keys, (0, 0, pad_old, 0)), F.pad(b.keys, (0, 0, pad_new, 0))])
        a.values = torch.cat([F.pad(a.values, (0, 0, pad_old, 0)), F.pad(b.values, (0, 0, pad_new, 0))])
    if hasattr(type(lm), "join_cache_state"):
        lm.join_cache_state(past, new, pad_old, pad_new)


def _trim(lm, past, first: int) -> None:
    """Cut the first `first` columns (attended to by no row) from every layer of `past` (and
    from a variant's state kept with the cache)."""
    for a in _layers(past):
        a.keys, a.values = a.keys[:, :, first:], a.values[:, :, first:]
    if hasattr(type(lm), "trim_cache_state"):
        lm.trim_cache_state(past, first)


def _next_prompts(queue: deque, prompts, running: int, columns: int, batch_size: int, max_batch_tokens: int,
                  max_new_tokens: int) -> list[int]:
    """The waiting prompts that fit beside `running` rows of `columns` cached tokens: at most
    batch_size rows and rows x (columns + new tokens) <= max_batch_tokens (one prompt always, when
    nothing runs, as a batch of one)."""
    new: list[int] = []
    cols = columns
    while queue and running + len(new) < batch_size:
        cols = max(cols, len(prompts[queue[0]]))  # the joined cache's columns with this prompt in
        if (running or new) and (running + len(new) + 1) * (cols + max_new_tokens) > max_batch_tokens:
            break
        new.append(queue.popleft())
    return new


@torch.no_grad()
def continuous_generate(lm, prompts: list[list[int]], *, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                        device, batch_size: int = 8, max_batch_tokens: int = 32768,
                        done: Callable[[int, list[int]], bool] | None = None,
                        on_batch: Callable[[int], None] | None = None,
                        batches: list[list[int]] | None = None, prefill: Callable | None = None) -> list[list[int]]:
    """`generate.greedy_generate`'s contract and stopping rules, with continuous batching.
    `batches`: the prompts this process decodes, taken in that order (default: all, longest
    first); on_batch(n) is called as n of them finish. Prompts that run out of GPU memory while
    joining go back to the queue, and fewer rows run from then on."""
    if not supports_continuous(lm):
        raise PearError(f"--decode continuous takes plain transformers models whose layers keep their whole "
                        f"cache; {type(lm).__name__} does not (use --decode eager)")
    fwd = Forward(lm)
    start = prefiller(lm, fwd, prefill, pad_id, device)
    out: list[list[int]] = [[] for _ in prompts]
    queue = deque([i for b in batches for i in b] if batches is not None
                  else sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)))
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    rows: list[int] = []  # example index of each row in the tensors
    fin: list[bool] = []
    past = mask = pos = logits = None  # the running rows' cache, (B, L) mask, (B, 1) positions, (B, V) logits
    with attention_backends():
        while queue or rows:
            new = []
            if queue and batch_size - len(rows) >= (max(1, batch_size // JOIN_WHEN_FREE) if rows else 1):
                new = _next_prompts(queue, prompts, len(rows), 0 if mask is None else mask.shape[1], batch_size,
                                    max_batch_tokens, max_new_tokens)
            if new:
                try:
                    lg2, past2, m2, p2 = start([prompts[i] for i in new])  # mask, positions (N, T)
                except torch.cuda.OutOfMemoryError:  # fewer rows from now on; one prompt alone cannot shrink
                    if not rows and len(new) == 1:
                        raise
                    queue.extendleft(reversed(new))
                    torch.cuda.empty_cache()
                    batch_size = max(1, len(rows) + len(new) // 2)
                    continue
                if past is None:
                    past, mask, pos, logits = past2, m2, p2[:, -1:], lg2
                else:
                    L = max(mask.shape[1], m2.shape[1])
                    _join(lm, past, past2, L - mask.shape[1], L - m2.shape[1])
                    mask = torch.cat([F.pad(mask, (L - mask.shape[1], 0)), F.pad(m2, (L - m2.shape[1], 0))])
                    pos, logits = torch.cat([pos, p2[:, -1:]]), torch.cat([logits, lg2])
                for i in new:
                    out[i] = []
                rows, fin = rows + new, fin + [False] * len(new)
            nxt = logits.argmax(-1)  # (B,)
            take_tokens(nxt, eos, rows, fin, out, done)
            for r, i in enumerate(rows):
                fin[r] = fin[r] or len(out[i]) >= max_new_tokens
            n_fin = sum(fin)
            if n_fin and (n_fin >= max(1, len(rows) // JOIN_WHEN_FREE) or n_fin == len(rows)):
                keep = [r for r, f in enumerate(fin) if not f]
                sel, before = torch.tensor(keep, dtype=torch.long, device=device), len(rows)
                if on_batch is not None:
                    on_batch(n_fin)
                rows, fin = [rows[r] for r in keep], [False] * len(keep)
                if not rows:
                    past = mask = pos = logits = None
                    continue
                if not select_cache_rows(lm, past, sel, before):
                    raise PearError("--decode continuous: this cache cannot drop rows (use --decode eager)")
                nxt, mask, pos = nxt[sel], mask[sel], pos[sel]
                first = int(mask.any(0).long().argmax())  # the first column a row still attends to
                if first:
                    _trim(lm, past, first)
                    mask = mask[:, first:]
            logits, past, mask, pos = decode_step(fwd, nxt, fin, past, mask, pos, pad_id)
    return out
