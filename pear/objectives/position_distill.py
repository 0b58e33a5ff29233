"""``position-distill``: read the whole context as well as its best-read part.

The same SQuAD 2.0 question and the same ``documents`` passages twice. The teacher sees the
gold passage first (``teacher=first``, default) or alone, without distractors
(``teacher=oracle``); the student sees it at a uniformly random interior index
(``student=middle``, default: neither first nor last) or at any index (``student=uniform``,
so the ends are held to the teacher too and cannot be traded for the middle).
Loss: KL(p_teacher ‖ p_student) over the vocabulary at each token of the gold answer
(teacher forced), where p_teacher is the *base* model (scales off: a fixed teacher, so
shrinking every head cannot make the two agree trivially) and p_student the scaled model.
After Pos2Distill (arXiv 2508.15709), which distils all weights; here only the scales learn.
``teacher=oracle`` asks the scales for what the model does when retrieval is trivial (the
closed "oracle" setting of the lost-in-the-middle study), wherever the passage sits.
"""

from __future__ import annotations

import random

import torch

from ..errors import PearError
from . import Objective, Sequence, answer_logprobs, pad_id_of, register, squad
from .retrieval import encode, squad_docs

TEACHERS = ("first", "oracle")
STUDENTS = ("middle", "uniform")


@register("position-distill")
class PositionDistill(Objective):
    OPTIONS = {"documents": 20, "words": 100, "teacher": "first", "student": "middle"}
    needs_data = True

    def check(self):
        o = self.options
        if o["documents"] < 3 or o["words"] < 10:
            raise PearError("position-distill: need documents >= 3 (first, middle, last) and words >= 10")
        if o["teacher"] not in TEACHERS:
            raise PearError(f"position-distill: teacher must be one of {', '.join(TEACHERS)}, got '{o['teacher']}'")
        if o["student"] not in STUDENTS:
            raise PearError(f"position-distill: student must be one of {', '.join(STUDENTS)}, got '{o['student']}'")

    def batch(self, model, tokenizer, n: int, seed: int) -> list[Sequence]:
        from ..evaluate.prompts import qa_prompt

        rng = random.Random(seed)
        o = self.options
        D = o["documents"]
        out = []
        for _ in range(n):
            item, distractors = squad.sample(self.data_dir, o["words"], D, rng)
            gold = rng.randrange(1, D - 1) if o["student"] == "middle" else rng.randrange(D)
            answer = item.answers[0]
            p_student, a = encode(tokenizer, qa_prompt(item.question, squad_docs(item, distractors, gold)), answer)
            teacher_docs = squad_docs(item, [] if o["teacher"] == "oracle" else distractors, 0)
            p_teacher, _ = encode(tokenizer, qa_prompt(item.question, teacher_docs), answer)
            out.append(Sequence(p_student + a, len(a), teacher_ids=p_teacher + a,
                                meta={"gold_index": gold, "teacher_gold_index": 0,
                                      "teacher_documents": len(teacher_docs), "answer": answer}))
        return out

    def loss(self, model, batch, scaling):
        pad = pad_id_of(None)
        n = [s.n_target for s in batch]
        with torch.no_grad(), scaling.disabled():
            teacher, _, _ = answer_logprobs(model, [s.teacher_ids for s in batch], n, pad)  # (B, A, V)
        student, _, m = answer_logprobs(model, [s.ids for s in batch], n, pad)
        kl = (teacher.exp() * (teacher - student)).sum(-1) * m  # (B, A)
        return (kl.sum(1) / m.sum(1)).mean()
