"""Batched greedy decoding and next-token log-likelihoods, through the variant contract only.

Everything here calls `lm(input_ids=, attention_mask=, position_ids=, past_key_values=,
use_cache=)` and reads `.logits` and `.past_key_values`; the cache is passed back as it came
(opaque), so an inference-time variant (pear.baselines) can keep anything in it. The one
other thing asked of a cache: dropping finished rows (`select_cache_rows`), which a variant
provides for its own cache, and without which every row stays to the end of its batch.

Batches: examples sorted by length (longest first, so an out-of-memory error comes at once)
and cut so that rows <= batch_size and rows x (longest prompt + new tokens) <= max_batch_tokens.
Prompts are left-padded; position ids are cumsum(mask) - 1 (clamped at 0 on the padding),
as `generate` computes them, so a row's result does not depend on its batch (up to the
rounding of 16-bit kernels, which differs with batch shape: compare models on identical batches).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..backends import attention_backends, fits_in_memory

CPU_LIMITS = (8, 32768)  # rows, rows x tokens: bigger batches were not faster on 2 cores
GPU_ROWS = 512  # decoding is Python-bound per step: many rows amortise it (measured on an H200)
GPU_TOKENS_CAP = 1_500_000
GPU_MEMORY_SHARE = 0.6  # of the free memory, for the batch; an out-of-memory batch is split anyway


def bytes_per_token(model) -> int:
    """Rough GPU bytes one (row, token) of a batch costs while decoding: its KV cache entries,
    three times (the cache, the copy a growing cache makes, the repeated keys of GQA attention),
    plus the largest per-token activation of a prefill (the MLP's) and a few hidden states."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 16)
    kv = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // heads)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 24)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    b = next(model.parameters()).element_size()
    return 3 * (2 * layers * kv * head_dim * b) + 2 * inter * b + 4 * hidden * b


def batch_limits(model, batch_size="auto", max_batch_tokens="auto", *, free_bytes: int | None = None,
                 device_type: str | None = None, memory_factor: float = 1.0) -> tuple[int, int]:
    """(rows, rows x tokens) per batch; "auto" for either picks it for the model's device:
    on CPU 8 rows and 32,768 tokens; on a GPU 512 rows and as many tokens as 60 % of the free
    memory holds at `bytes_per_token` times `memory_factor` (a variant's, `Variant.memory`; at
    most 1.5M: SmolLM2-135M and Qwen2.5-0.5B ran at 512 x 1.5M on an H200 with ~77 GB at peak)."""
    dev = device_type or model.get_input_embeddings().weight.device.type
    if dev == "cuda":
        if free_bytes is None:
            free_bytes = gpu_free_bytes(model.get_input_embeddings().weight.device)
        per_token = bytes_per_token(model) * memory_factor
        rows, tokens = GPU_ROWS, min(GPU_TOKENS_CAP, int(GPU_MEMORY_SHARE * free_bytes / per_token))
    else:
        rows, tokens = CPU_LIMITS
    return (rows if batch_size == "auto" else int(batch_size),
            max(1, tokens) if max_batch_tokens == "auto" else int(max_batch_tokens))


def gpu_free_bytes(device) -> int:
    """Free GPU memory this process may still take: the device's free memory, or less where the
    process has a share of the GPU (several processes on one GPU, pear.distributed)."""
    free, total = torch.cuda.mem_get_info(device)
    share = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    if share < 1:
        free = min(free, int(share * total) - torch.cuda.memory_reserved(device))
    return max(0, free)


def make_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int, extra: int = 0) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * (longest + extra) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


class Forward:
    """Calls `lm`, asking for the last position's logits only where the forward accepts
    `logits_to_keep` (Hugging Face models do): full-vocabulary logits for every prompt token
    would be B x T x V (64 x 1,400 x 152k in bf16 = 27 GB for Qwen2.5)."""

    def __init__(self, lm):
        self.lm = lm
        self.keep_last = True

    def __call__(self, **kw) -> tuple[torch.Tensor, object]:
        if self.keep_last:
            try:
                out = self.lm(**kw, logits_to_keep=1)
            except TypeError as e:
                if "logits_to_keep" not in str(e):
                    raise
                self.keep_last = False
                out = self.lm(**kw)
        else:
            out = self.lm(**kw)
        return out.logits[:, -1], out.past_key_values  # (B, V)


def _split_on_oom(run, batch: list[int]) -> None:
    """run(batch); if the GPU runs out of memory, free it and run each half instead."""
    ok, _ = fits_in_memory(run, batch, can_shrink=len(batch) > 1)
    if ok:
        return
    torch.cuda.empty_cache()
    half = len(batch) // 2
    _split_on_oom(run, batch[:half])
    _split_on_oom(run, batch[half:])


def prefiller(lm, fwd: Forward, prefill: Callable | None, pad_id: int, device) -> Callable:
    """rows (prompts' token ids) -> (last logits (B, V), cache, mask (B, T), positions (B, T)):
    `prefill(lm, rows, pad_id, device)` (`packed.packed_prefill`), or by default the prompts
    left-padded in one batch."""
    if prefill is not None:
        return lambda rows: prefill(lm, rows, pad_id, device)

    def padded(rows: list[list[int]]):
        ids, mask, pos = left_pad(rows, pad_id, device)
        logits, past = fwd(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=True)
        return logits, past, mask, pos
    return padded


def select_cache_rows(lm, past, keep: torch.Tensor, rows: int) -> bool:
    """Cut the cache `past` (of a batch of `rows` sequences) down to the rows `keep`, in place.

    An inference-time variant whose cache holds more than the model's own (pear.baselines)
    says how with a method `select_cache_rows(past, keep, rows)`; a plain transformers cache
    has `batch_select_indices`. False when neither applies: the caller keeps every row.
    """
    own = getattr(type(lm), "select_cache_rows", None)
    if own is not None:
        return bool(lm.select_cache_rows(past, keep, rows))
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(keep)
        return True
    return False


@torch.no_grad()
def greedy_generate(lm, prompts: list[list[int]], *, pad_id: int, eos_ids: set[int], max_new_tokens: int,
                    device, batch_size: int = 8, max_batch_tokens: int = 32768,
                    done: Callable[[int, list[int]], bool] | None = None,
                    on_batch: Callable[[int], None] | None = None, compact: bool = True,
                    batches: list[list[int]] | None = None, prefill: Callable | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids, EOS not included).

    `batches` (lists of prompt indices) replaces the batching by length: a process of a
    data-parallel run decodes its share of the batches (`pear.distributed.shard`) and leaves
    the other prompts' outputs empty.

    A row stops at an EOS token, after `max_new_tokens`, or once `done(index, new_ids)` says
    that more tokens cannot change its score (e.g. the first line is complete). With
    `compact`, finished rows are dropped from the batch (inputs and cache) once a quarter of
    the rows still running have finished: answers are short (median ~20 tokens on MDQA) but
    a few run to the limit, and each decoding step costs in proportion to the rows it carries.

    `prefill(lm, rows, pad_id, device)` -> (last logits (B, V), cache, mask (B, T), positions
    (B, T)) replaces the left-padded prefill (`packed.packed_prefill`: the prompts in one row).
    """
    fwd = Forward(lm)
    start = prefiller(lm, fwd, prefill, pad_id, device)
    out: list[list[int]] = [[] for _ in prompts]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

    def run(batch: list[int]) -> None:
        for i in batch:
            out[i] = []
        rows = list(batch)  # example index of each row still in the tensors
        logits, past, mask, pos = start([prompts[i] for i in batch])
        fin = [False] * len(rows)
        can_compact = compact
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            take_tokens(nxt, eos, rows, fin, out, done)
            if all(fin) or step == max_new_tokens - 1:
                break
            if can_compact and sum(fin) >= max(1, len(rows) // 4):
                keep = [r for r, f in enumerate(fin) if not f]
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                if select_cache_rows(lm, past, sel, len(rows)):
                    nxt, mask, pos = nxt[sel], mask[sel], pos[sel]
                    rows, fin = [rows[r] for r in keep], [False] * len(keep)
                else:
                    can_compact = False
            logits, past, mask, pos = decode_step(fwd, nxt, fin, past, mask, pos, pad_id)

    decode_batches(run, prompts, batches, batch_size, max_batch_tokens, max_new_tokens, on_batch)
    return out


def decode_step(fwd: Forward, nxt: torch.Tensor, fin: list[bool], past, mask: torch.Tensor, pos: torch.Tensor,
                pad_id: int) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
    """One decoding step of the rows in the tensors: their tokens `nxt` (B,) in, finished rows fed
    padding; (next logits (B, V), cache, mask (B, L+1), positions (B, 1)) out."""
    nxt = nxt.masked_fill(torch.tensor(fin, device=nxt.device), pad_id)  # finished rows: padding
    mask = torch.cat([mask, mask.new_ones((len(fin), 1))], dim=1)
    pos = pos[:, -1:] + 1
    logits, past = fwd(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                       use_cache=True)
    return logits, past, mask, pos


def take_tokens(nxt: torch.Tensor, eos: torch.Tensor, rows: list[int], fin: list[bool], out: list[list[int]],
                done: Callable[[int, list[int]], bool] | None) -> None:
    """One decoding step's greedy tokens `nxt` (B,) into the outputs of the rows still running:
    a row finishes at EOS (not kept) or once `done(index, new_ids)` says so."""
    take_token_list(nxt.tolist(), torch.isin(nxt, eos).tolist(), rows, fin, out, done)


def take_token_list(toks: list[int], hit_eos: list[bool], rows: list[int], fin: list[bool], out: list[list[int]],
                    done: Callable[[int, list[int]], bool] | None) -> None:
    """`take_tokens` on tokens already on the host (`hit_eos`: whether each is an end-of-sequence id)."""
    for r, i in enumerate(rows):
        if fin[r]:
            continue
        if hit_eos[r]:
            fin[r] = True
            continue
        out[i].append(toks[r])
        if done is not None and done(i, out[i]):
            fin[r] = True


def decode_batches(run: Callable[[list[int]], None], prompts, batches, batch_size: int, max_batch_tokens: int,
                   max_new_tokens: int, on_batch) -> None:
    """run(batch) for every batch (given, or cut by length), halving a batch that runs out of memory."""
    with attention_backends():
        for batch in batches if batches is not None else \
                make_batches([len(p) for p in prompts], batch_size, max_batch_tokens, max_new_tokens):
            _split_on_oom(run, batch)
            if on_batch is not None:
                on_batch(len(batch))


@torch.no_grad()
def next_token_logprobs(lm, prompts: list[list[int]], token_ids: list[int], *, pad_id: int, device,
                        batch_size: int = 8, max_batch_tokens: int = 32768,
                        on_batch: Callable[[int], None] | None = None,
                        batches: list[list[int]] | None = None) -> np.ndarray:
    """(N, len(token_ids)) log-probabilities (full-vocabulary softmax, fp32) of each candidate
    token right after each prompt: one forward pass per prompt, no cache. `batches`: as in
    `greedy_generate` (rows of prompts left out stay 0)."""
    fwd = Forward(lm)
    out = np.zeros((len(prompts), len(token_ids)), dtype=np.float64)
    cand = torch.tensor(token_ids, dtype=torch.long, device=device)
    def run(batch: list[int]) -> None:
        ids, mask, pos = left_pad([prompts[i] for i in batch], pad_id, device)
        logits, _ = fwd(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=False)
        lp = torch.log_softmax(logits.float(), dim=-1)[:, cand]  # (B, C)
        out[batch] = lp.cpu().numpy()

    with attention_backends():
        for batch in batches if batches is not None else make_batches([len(p) for p in prompts], batch_size,
                                                                      max_batch_tokens):
            _split_on_oom(run, batch)
            if on_batch is not None:
                on_batch(len(batch))
    return out


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS of the tokenizer and of the generation config, plus the end-of-turn tokens of the
    common chat formats when they are special tokens of this tokenizer."""
    ids = set()
    gen_cfg = getattr(model, "generation_config", None)
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    except AttributeError:
        added = set()
    for t in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        if t in special or t in added:
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0:
                ids.add(i)
    return ids


WINDOW_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length")


def context_window(model) -> int | None:
    """The longest sequence the model's configuration allows (the first of WINDOW_ATTRIBUTES
    it sets: families name it differently), or None where it says nothing. The one definition
    for every command (`pear eval` skips what does not fit; `pear bench` refuses it)."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for name in WINDOW_ATTRIBUTES:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
