"""``position-distill``: read the middle of the context as well as its start.

The same SQuAD 2.0 question and the same ``documents`` passages twice: once with the gold
passage first, once with it at a uniformly random interior index (neither first nor last).
Loss: KL(p_first ‖ p_middle) over the vocabulary at each token of the gold answer (teacher
forced), where p_first is the *base* model (scales off: a fixed teacher, so shrinking every
head cannot make the two agree trivially) and p_middle the scaled model. After Pos2Distill
(arXiv 2508.15709), which distils all weights; here only the scales learn.
"""

from __future__ import annotations

import random

import torch

from ..errors import PearError
from . import Objective, Sequence, answer_logprobs, pad_id_of, register, squad
from .retrieval import encode, squad_docs


@register("position-distill")
class PositionDistill(Objective):
    OPTIONS = {"documents": 20, "words": 100}
    needs_data = True

    def check(self):
        if self.options["documents"] < 3 or self.options["words"] < 10:
            raise PearError("position-distill: need documents >= 3 (first, middle, last) and words >= 10")

    def batch(self, model, tokenizer, n: int, seed: int) -> list[Sequence]:
        from ..evaluate.prompts import qa_prompt

        rng = random.Random(seed)
        D = self.options["documents"]
        out = []
        for _ in range(n):
            item, distractors = squad.sample(self.data_dir, self.options["words"], D, rng)
            middle = rng.randrange(1, D - 1)
            answer = item.answers[0]
            p_mid, a = encode(tokenizer, qa_prompt(item.question, squad_docs(item, distractors, middle)), answer)
            p_first, _ = encode(tokenizer, qa_prompt(item.question, squad_docs(item, distractors, 0)), answer)
            out.append(Sequence(p_mid + a, len(a), teacher_ids=p_first + a,
                                meta={"gold_index": middle, "teacher_gold_index": 0, "answer": answer}))
        return out

    def loss(self, model, batch, scaling):
        pad = pad_id_of(None)
        n = [s.n_target for s in batch]
        with torch.no_grad(), scaling.disabled():
            teacher, _, _ = answer_logprobs(model, [s.teacher_ids for s in batch], n, pad)  # (B, A, V)
        student, _, m = answer_logprobs(model, [s.ids for s in batch], n, pad)
        kl = (teacher.exp() * (teacher - student)).sum(-1) * m  # (B, A)
        return (kl.sum(1) / m.sum(1)).mean()
