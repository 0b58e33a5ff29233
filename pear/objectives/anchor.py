"""The knowledge anchor: keep the scaled model's next-token distribution on ordinary text.

Every recipe that reads long contexts better also changes the model on inputs without a
context: measured on Gemma-3-270M, `retrieval-channels` gains +18 points on mdqa-20 and costs
1.9 points of MMLU (BENCHMARKS.md §5). The anchor adds, with weight ``anchor`` (``--anchor``),
KL(base ‖ scaled) over the vocabulary at the last ``TOKENS`` tokens of plain Wikipedia
paragraphs: SQuAD 2.0 contexts, without a question, which no evaluation task reads. The base
is the model with the scales off (`scaling.disabled()`), so the term is 0 at α = 1 and grows
only where a scale changes what the model predicts from its own knowledge. The anchor's
paragraphs of step s are a pure function of (seed, s), from a stream the objective's batches
do not use (`pear.settings.anchor_seed`).

``anchor_source=questions`` anchors answers instead of text: SQuAD 2.0 questions without their
passage, in the closed-book prompt (rendered as the evaluation renders prompts), KL at the
position that predicts the answer's first token — the distribution a knowledge question is
answered from, which plain paragraphs reach only indirectly.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from . import answer_logprobs, pad_id_of, squad

WORDS = 100  # words per paragraph (about the length of one evaluation passage)
TOKENS = 64  # the KL is taken at the last TOKENS tokens of each paragraph


class Source(NamedTuple):
    tokens: int  # positions of the KL at each sequence's end
    text: str  # what report.md says the anchor reads


SOURCES = {"paragraphs": Source(TOKENS, "plain text"),  # anchor_source
           "questions": Source(1, "closed-book questions (the answer's first token)")}


def check_data(data_dir) -> None:
    """Fail before any model work when SQuAD 2.0, whose paragraphs the anchor reads, is missing."""
    squad.path(data_dir)


def batch(tokenizer, data_dir, n: int, seed: int, source: str = "paragraphs") -> list[list[int]]:
    """`n` paragraphs as token ids (with the tokenizer's special tokens, no chat template), or
    (source=questions) `n` closed-book question prompts as the evaluation renders them."""
    from ..evaluate.prompts import closedbook_prompt
    from .retrieval import encode

    items, paragraphs = squad.load(str(data_dir) if data_dir else "", WORDS)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if source == "questions":  # + one placeholder token: the KL at the position before it (causal: unseen)
            prompt = encode(tokenizer, closedbook_prompt(items[rng.randrange(len(items))].question), "")[0]
            out.append(prompt + [prompt[-1]])
            continue
        title, text = paragraphs[rng.randrange(len(paragraphs))]
        out.append(list(tokenizer(f"{title}\n{text}")["input_ids"]))
    return out


def loss(model, seqs: list[list[int]], scaling, source: str = "paragraphs") -> torch.Tensor:
    """Mean over sequences of the mean KL(base ‖ scaled) at the positions that predict their last
    `SOURCES[source].tokens` tokens (a question's placeholder: the answer's first token)."""
    n = [min(SOURCES[source].tokens, len(s) - 1) for s in seqs]
    with torch.no_grad(), scaling.disabled():
        base, _, _ = answer_logprobs(model, seqs, n, pad_id_of(None))  # (B, A, V)
    scaled, _, m = answer_logprobs(model, seqs, n, pad_id_of(None))
    kl = (base.exp() * (base - scaled)).sum(-1) * m  # (B, A)
    return (kl.sum(1) / m.sum(1)).mean()
