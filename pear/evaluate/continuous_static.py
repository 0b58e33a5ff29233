"""Continuous batching on a static KV cache, the decoding step compiled into CUDA graphs
(`pear eval --decode continuous-static`).

Why: the two faster decoding paths each remove one cost of the eager loop and keep the other.
`--decode continuous` keeps the rows full (finished rows make room for waiting prompts) but
launches every kernel from Python at each step; `--decode static` replays the step as CUDA
graphs but decodes each batch until its longest answer ends. Here both: a fixed number of row
slots over one preallocated cache, so the step always has the same shapes and is compiled once
(`static_decode.StaticDecoder`), and prompts join the free slots as rows finish.

The layout. Every slot shares one write column `c` (the static cache writes one column per step
for all rows): a prompt joins with its last token at column c - 1, its keys and values copied from
its prefill (left-padded, packed or not) into its slot, and a mask row (slots, length) says which
columns each slot attends to; position ids are per row, so where a prompt sits in the cache
changes nothing it computes (keys are stored rotated). When c reaches the cache's end, every
column that no running row attends to is cut from the left (the cache moved in place, once per
~max-new-tokens steps); when a joining prompt is longer than c, the rows move right instead.
Free slots decode padding and attend to their own new column only (no row is ever all-masked);
their tokens are not read. Every slot's mask is thus one range of columns, which lets the step's
attention read each range in place with FlashAttention where the GPU takes it (`step_attention`).

The answers are the eager loop's in fp32 (tests); in 16 bits they may differ as under any other
batching (attention runs over the whole cache, the unused columns masked). Plain transformers
models whose layers keep their whole cache only (a variant owns its cache; a sliding-window layer
keeps its last tokens only). On CPU nothing is compiled by default: the same layout, eagerly.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from ..backends import attention_backends
from ..errors import PearError
from .continuous import JOIN_WHEN_FREE, supports_continuous
from .generate import Forward, prefiller, take_token_list
from .static_decode import CACHE_BUCKET, StaticDecoder, supports_static
from .step_attention import grouped_decoding


def supports_continuous_static(lm) -> bool:
    """A model that takes both: a static cache under torch.compile and joins (every layer's whole cache)."""
    return supports_static(lm) and supports_continuous(lm)


class ContinuousStaticDecoder(StaticDecoder):
    """`--decode continuous-static` for the harness: `generate` has `greedy_generate`'s contract.
    prefill: how joining prompts are read, as `--prefill` names it (`packed.PREFILLS`, or "padded");
    compile / backend / mode / dynamic: as `StaticDecoder`'s."""

    decode = "continuous-static"

    def __init__(self, model, prefill: str = "padded", **compile_kw):
        if not supports_continuous_static(model):
            raise PearError(f"--decode continuous-static takes plain transformers models that compile with a static "
                            f"cache and keep their whole cache in every layer; {type(model).__name__} does not "
                            "(use --decode eager)")
        super().__init__(model, **compile_kw)
        from .packed import PREFILLS

        self.prefill = prefill
        self.prefill_fn = PREFILLS.get(prefill)  # None: padded

    @property
    def name(self) -> str:  # in the results' part keys
        return self.decode if self.prefill == "padded" else f"{self.decode}+{self.prefill}"

    def generate(self, model, prompts, **kw) -> list[list[int]]:
        return continuous_static_generate(model, prompts, decoder=self, prefill=self.prefill_fn, **kw)


def _set_column(cache, c: int) -> None:
    """The column the next step writes (the static layers' write counter), where it jumps: each
    step moves the counter on by one itself."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(c)


def _move(cache, mask: torch.Tensor, first: int, end: int, to: int) -> None:
    """Move the columns [first, end) of every row to end at column `to`, in place (the compiled step
    reads the cache at fixed addresses); the mask keeps nothing outside the moved columns."""
    n = end - first
    for layer in cache.layers:  # keys and values (S, KVH, L, D)
        for x in (layer.keys, layer.values):
            x[:, :, to - n: to] = x[:, :, first:end].clone()
    moved = mask[:, first:end].clone()
    mask.zero_()
    mask[:, to - n: to] = moved


def _first_held(mask: torch.Tensor, rows: list[int]) -> int:
    """The first column that a slot still holding a row attends to (columns before it can go)."""
    return int(mask[[s for s, r in enumerate(rows) if r >= 0]].any(0).long().argmax())


def _place(cache, past, slots: torch.Tensor, c: int, S: int) -> None:
    """The joining prompts' cache `past` ((N, KVH, T, D) layers, left-padded) into `slots` of the
    S-slot cache, its last column at c - 1."""
    for a, b in zip(cache.layers, past.layers):
        if not a.is_initialized:  # the static layer takes its rows, heads, dtype and device from a first tensor
            a.lazy_initialization(b.keys.new_empty((S, *b.keys.shape[1:2], 1, b.keys.shape[3])),
                                  b.values.new_empty((S, *b.values.shape[1:2], 1, b.values.shape[3])))
        T = b.keys.shape[2]
        a.keys[slots, :, c - T: c] = b.keys
        a.values[slots, :, c - T: c] = b.values


class _HostTokens:
    """The slots' tokens copied to the host without waiting for the GPU work queued after them: a
    pinned buffer and an event on CUDA (the copy is queued before the next step, so reading waits
    for the tokens only), a plain list elsewhere."""

    def __init__(self, slots: int, device):
        self.cuda = torch.device(device).type == "cuda"
        self.buf = torch.empty(slots, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.toks: list[int] = []

    def copy(self, nxt: torch.Tensor) -> None:
        if self.cuda:
            self.buf.copy_(nxt, non_blocking=True)
            self.event.record()
        else:
            self.toks = nxt.tolist()

    def read(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
            return self.buf.tolist()
        return self.toks


@torch.no_grad()
def continuous_static_generate(lm, prompts: list[list[int]], *, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                               device, batch_size: int = 8, max_batch_tokens: int = 32768,
                               done: Callable[[int, list[int]], bool] | None = None,
                               on_batch: Callable[[int], None] | None = None,
                               batches: list[list[int]] | None = None, prefill: Callable | None = None,
                               decoder: ContinuousStaticDecoder | None = None) -> list[list[int]]:
    """`generate.greedy_generate`'s contract and stopping rules: continuous batching over
    min(batch_size, max_batch_tokens // length) slots of one static cache of `length` columns (the
    longest prompt plus the token budget, rounded up to CACHE_BUCKET). `batches`: the prompts this
    process decodes, in that order (default: all, longest first); on_batch(n) as n of them finish.

    Pipelined: each step is queued before the tokens of the one before it are read on the host, so
    the loop's Python (stopping rules, bookkeeping) runs while the GPU computes. A row learns that it
    has finished one step late and decodes one token more, which is not kept; a row never runs past
    its token budget (its steps are counted), so its columns fit the cache as before."""
    dec = decoder or ContinuousStaticDecoder(lm)
    order = [i for b in batches for i in b] if batches is not None \
        else sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    if not order:
        return out
    longest = max(len(prompts[i]) for i in order)
    length = -(-(longest + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    S = max(1, min(batch_size, max_batch_tokens // length))  # slots
    start = prefiller(lm, Forward(lm), prefill, pad_id, device)
    cache = dec.begin(S, length)
    queue = deque(order)
    host = _HostTokens(S, device)
    rows = [-1] * S  # example index of each slot; -1: free
    fin = [True] * S  # finished or free: its token is not taken
    steps = [0] * S  # decoding steps queued for the slot's row (its tokens: one from the prompt, one a step)
    mask = torch.zeros((S, length), dtype=torch.long, device=device)  # the columns each slot attends to
    pos = torch.zeros((S, 1), dtype=torch.long, device=device)  # (S, 1) each slot's last position
    nxt = torch.full((S,), pad_id, dtype=torch.long, device=device)  # (S,) each slot's next token
    c = 0  # the column the next step writes
    unread = False  # nxt holds tokens the host has not taken yet
    with attention_backends(), grouped_decoding(lm, ranges=True):
        while True:
            free = [s for s in range(S) if rows[s] < 0]
            if queue and len(free) >= (max(1, S // JOIN_WHEN_FREE) if len(free) < S else 1):
                new = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                logits2, past2, m2, p2 = start([prompts[i] for i in new])  # (N, V), cache, mask and positions (N, T)
                T = m2.shape[1]
                if len(free) == S:
                    c = T
                    _set_column(cache, c)
                elif c < T:  # the running rows move right to make room
                    first = _first_held(mask, rows)
                    _move(cache, mask, first, c, T)
                    c = T
                    _set_column(cache, c)
                slots = torch.tensor(free[: len(new)], dtype=torch.long, device=device)
                _place(cache, past2, slots, c, S)
                mask[slots] = 0
                mask[slots, c - T: c] = m2
                pos[slots] = p2[:, -1:]
                nxt[slots] = logits2.argmax(-1)
                for s, i in zip(free, new):
                    rows[s], fin[s], steps[s], out[i] = i, False, 0, []
                unread = True
            if unread:  # the tokens to take this round, copied before the next step is queued
                host.copy(nxt)
            live = [not fin[s] and steps[s] < max_new_tokens - 1 for s in range(S)]  # a step's work (one late)
            if any(live):
                if c == length:  # the cache is full: cut the columns no row still held attends to
                    first = _first_held(mask, rows)
                    _move(cache, mask, first, c, c - first)
                    c -= first
                    _set_column(cache, c)
                mask[:, c] = 1
                idle = torch.tensor([not x for x in live], device=device)  # (S,) padding at position 0
                pos = (pos + 1).masked_fill(idle[:, None], 0)
                logits = dec(input_ids=nxt.masked_fill(idle, pad_id)[:, None],
                             attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)  # (S, V)
                nxt = logits.argmax(-1)
                c += 1  # as the step moved each layer's counter
                for s in range(S):
                    steps[s] += live[s]
            if unread:  # while the step runs
                toks = host.read()
                take_token_list(toks, [t in eos_ids for t in toks], rows, fin, out, done)
            unread = any(live)
            ended = [s for s in range(S) if rows[s] >= 0 and (fin[s] or len(out[rows[s]]) >= max_new_tokens)]
            for s in ended:
                rows[s], fin[s] = -1, True
            if ended and on_batch is not None:
                on_batch(len(ended))
            if not queue and all(r < 0 for r in rows):
                break
    return out
