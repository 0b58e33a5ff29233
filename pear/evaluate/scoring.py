"""One model on one task: render the prompts, skip those that do not fit, batch, score.

A task's `kind` picks its scorer from SCORERS (lm-eval-harness's output types, as data):
"generate" decodes greedily and scores the text, "choice" compares the next-token
log-probabilities of single-token choices. A new kind is one function registered here.

Under `torchrun` / `accelerate launch` the batches (cut by length exactly as one process cuts
them) are shared out between the processes, each scores its own, and every process ends with
all the records: the same records, batch for batch, as one process computes.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Callable

from .. import distributed
from ..errors import PearError
from ..loading import LoadedModel
from .generate import context_window, eos_token_ids, greedy_generate, make_batches, next_token_logprobs
from .prompts import has_chat_template, render
from .registry import Task

Scorer = Callable[..., dict[int, dict]]
SCORERS: dict[str, Scorer] = {}


def register_scorer(kind: str):
    def deco(fn: Scorer) -> Scorer:
        SCORERS[kind] = fn
        return fn
    return deco


def _use_chat(task: Task, tokenizer, chat: str) -> bool:
    if chat not in ("auto", "on", "off"):
        raise PearError(f"--chat must be auto, on or off, not '{chat}'")
    if not task.chat or chat == "off":
        return False
    if chat == "on" and not has_chat_template(tokenizer):
        raise PearError("--chat on, but the model's tokenizer has no chat template")
    return has_chat_template(tokenizer)


def render_prompts(loaded: LoadedModel, task: Task, chat: str) -> tuple[list[str], list[list[int]]]:
    """The exact texts the model reads and their token ids. A chat-rendered text already
    holds its special tokens, so no others are added to it."""
    tok = loaded.tokenizer
    use_chat = _use_chat(task, tok, chat)
    texts = [render(tok, e.prompt, use_chat) for e in task.examples]
    ids = tok(texts, add_special_tokens=not use_chat)["input_ids"]
    return texts, [list(x) for x in ids]


def _estimating(bar, n_total: int, desc: str, progress: bool):
    """The bar's update, which after the first batch also prints what the rest will take
    (measured on that batch) before the long part."""
    from ..estimate import fmt_seconds

    t0, first = time.perf_counter(), [True]

    def update(n: int) -> None:
        bar.update(n)
        if first[0] and progress and n < n_total:
            first[0] = False
            dt = time.perf_counter() - t0
            bar.write(f"pear: {desc}: first {n} examples in {dt:.1f} s; estimate ~{fmt_seconds(dt / n * (n_total - n))} "
                      f"for the other {n_total - n}", file=sys.stderr)

    return update


_HOLDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {characters: token ids}


def tokens_holding(tok, chars: str) -> frozenset[int]:
    """The ids of the tokens whose own text (decoded alone, special tokens skipped) holds one of `chars`.

    Why: `done` decodes a row's whole answer, and asked at every step for every row it cost ~20 us a row
    (~5-10 ms a step at 512 rows, profiled on CPU), as much as a compiled decoding step. For a task whose
    `done` can turn true only when the text gains one of `Task.done_on` (QA: the first newline), it is
    asked only at a token holding one. A newline of a decoded text comes from some token's own text
    (byte-level BPE decodes bytes in order, and an ASCII byte is never part of another character);
    byte-fallback vocabularies can lose one inside an invalid byte sequence, which only asks `done` once
    more for nothing. So answers stop where they stopped before: tests for SmolLM2's tokenizer and a
    byte-fallback one; 1,000 random sequences each for Qwen2.5's and Gemma 3's gave the same stops."""
    by_chars = _HOLDING.setdefault(tok, {})
    if chars not in by_chars:
        texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
        by_chars[chars] = frozenset(i for i, t in enumerate(texts) if any(c in t for c in chars))
    return by_chars[chars]


@register_scorer("generate")
def score_generate(lm, loaded: LoadedModel, task: Task, examples, prompts, batches, decoder=None,
                   **kw) -> dict[int, dict]:
    """Greedy answers, scored by the task; stops early once `task.done` says the score is settled.
    decoder: a StaticDecoder of `lm`, a ContinuousDecoder or a PackedDecoder (`--decode static / continuous / packed`: its
    `generate`), else the eager loop."""
    tok = loaded.tokenizer
    gate = tokens_holding(tok, task.done_on) if task.done is not None and task.done_on else None

    def done(j, new):
        if task.done is None or (gate is not None and new[-1] not in gate):  # the text gained none of done_on
            return False
        return task.done(tok.decode(new, skip_special_tokens=True), examples[j])

    gen = greedy_generate if decoder is None else decoder.generate
    outs = gen(lm, prompts, eos_ids=eos_token_ids(loaded.model, tok), max_new_tokens=task.max_new_tokens,
               done=done, batches=batches, **kw)
    res = {}
    for j in (j for b in batches for j in b):
        text = tok.decode(outs[j], skip_special_tokens=True)
        res[j] = {"output": text, "score": float(task.score(text, examples[j])), "n_new_tokens": len(outs[j])}
    return res


@register_scorer("choice")
def score_choice(lm, loaded: LoadedModel, task: Task, examples, prompts, batches, decoder=None,
                 **kw) -> dict[int, dict]:
    """The choice whose (single) token is most likely next; its log-probabilities kept (one
    forward per prompt: no decoding, so `decoder` plays no part)."""
    cand = []
    for c in task.choices:
        t = loaded.tokenizer.encode(c, add_special_tokens=False)
        if len(t) != 1:
            raise PearError(f"task {task.name}: choice {c!r} is {len(t)} tokens for this tokenizer; "
                            "only single-token choices are supported")
        cand.append(t[0])
    lp = next_token_logprobs(lm, prompts, cand, batches=batches, **kw)
    res = {}
    for j in (j for b in batches for j in b):
        pred = int(lp[j].argmax())
        res[j] = {"output": task.choices[pred].strip(), "logprobs": [round(float(v), 4) for v in lp[j]],
                  "score": float(task.choices[pred].strip() == examples[j].answers[0])}
    return res


def run_task(lm, loaded: LoadedModel, task: Task, *, chat: str = "auto", batch_size: int = 8,
             max_batch_tokens: int = 32768, progress: bool = True, desc: str = "",
             rendered: tuple[list[str], list[list[int]]] | None = None, decoder=None) -> list[dict]:
    """Records, one per example, in example order: id, condition, score (None = skipped),
    output, n_prompt_tokens, and for choice tasks the choice log-probabilities.
    decoder: a decoder's `generate` replaces the eager loop (`--decode static / continuous / packed`)."""
    from tqdm.auto import tqdm

    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise PearError(f"model '{loaded.spec.spec}' has no tokenizer; cannot evaluate it")
    if task.kind not in SCORERS:
        raise PearError(f"task {task.name}: unknown kind {task.kind}")
    texts, ids = rendered or render_prompts(loaded, task, chat)
    window = context_window(model)
    extra = task.max_new_tokens if task.kind == "generate" else 0
    fits = [window is None or len(x) + extra <= window for x in ids]
    keep = [i for i, f in enumerate(fits) if f]  # never truncate: what does not fit is skipped and counted
    records = [{"id": e.id, "condition": e.condition, "score": None, "output": None,
                "n_prompt_tokens": len(x), "skipped": not f} for e, x, f in zip(task.examples, ids, fits)]
    prompts = [ids[i] for i in keep]
    mine = distributed.shard(make_batches([len(p) for p in prompts], batch_size, max_batch_tokens, extra))
    n_mine = sum(map(len, mine))
    bar = tqdm(total=n_mine, unit="ex", desc=desc or task.name, dynamic_ncols=True, leave=False,
               disable=not progress or not distributed.is_main())
    kw = dict(pad_id=tok.pad_token_id, device=model.get_input_embeddings().weight.device, batch_size=batch_size,
              max_batch_tokens=max_batch_tokens, on_batch=_estimating(bar, n_mine, desc or task.name, progress))
    scored = SCORERS[task.kind](lm, loaded, task, [task.examples[i] for i in keep], prompts, mine, decoder=decoder,
                                **kw)
    bar.close()
    for part in distributed.gather(scored):  # every rank's batches, on every rank
        for j, fields in part.items():
            records[keep[j]].update(fields)
    return records
