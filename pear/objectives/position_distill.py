"""``position-distill``: read the whole context as well as its best-read part.

The same SQuAD 2.0 question and the same ``documents`` passages twice. The teacher sees the
gold passage first (``teacher=first``, default), last (``teacher=last``) or alone, without
distractors (``teacher=oracle``); the student sees it at a uniformly random interior index
(``student=middle``, default: neither first nor last) or at any index (``student=uniform``,
so the ends are held to the teacher too and cannot be traded for the middle).
Loss: KL(p_teacher ‖ p_student) over the vocabulary at each token of the gold answer
(teacher forced), where p_teacher is the *base* model (scales off: a fixed teacher, so
shrinking every head cannot make the two agree trivially) and p_student the scaled model.
After Pos2Distill (arXiv 2508.15709), which distils all weights; here only the scales learn.
``hold=h`` (teacher first or last): in a fraction h of the sequences the student reads the gold
passage where the teacher does, so its prompt is the teacher's and the KL there is zero until the
scales move. Why: one set of scales serves every position, and with the uniform student a
twentieth of the sequences did not keep the place the model reads best (the last-of-20 teacher
lifted SmolLM2-135M's gold 1 by 13 points and cost gold 20 12; BENCHMARKS.md §5, rounds 8-10);
h weighs keeping that place against lifting the others.
``teacher=oracle`` asks the scales for what the model does when retrieval is trivial (the
closed "oracle" setting of the lost-in-the-middle study), wherever the passage sits.
``teacher=last`` is the best-read place of a recency-shaped model: SmolLM2-135M answers 40 % of
mdqa-20 with the gold passage last and 9-19 % elsewhere (BENCHMARKS.md §5, round 2's base), so the
teacher's own answers there are both right more often and in the 20-passage prompt's form.

``target=teacher``: the answer tokens are the base model's own greedy answer to the teacher's
prompt (its first line, with the token that ends it), kept only where it contains a gold answer
(the evaluation's metric), instead of SQuAD's gold span. Why: with the gold span (a two-to-four
word SQuAD span, off the model's own style) as the answer, the scales learn the answer's format
as much as the reading: `retrieval` cut SmolLM2's and Qwen's answers to SQuAD's length and
lost on the first line, `oracle-distill-channels` doubled SmolLM2's (BENCHMARKS.md §5, the length
check). The model's own answer keeps its format, so what is left to learn is where to read.
"""

from __future__ import annotations

import math
import random

import torch

from ..errors import PearError
from ..evaluate.metrics import qa_score
from . import Objective, Sequence, answer_logprobs, pad_id_of, register, squad
from .retrieval import encode, squad_docs

TEACHERS = ("first", "last", "oracle")  # where the teacher reads the gold passage
STUDENTS = ("middle", "uniform")
TARGETS = ("gold", "teacher")
ANSWER_TOKENS = 48  # target=teacher: the longest answer kept (SmolLM2's median is 16 tokens on mdqa-20)
DRAWS = 20  # target=teacher: questions drawn per sequence kept, at most, before giving up (SmolLM2-135M
# answered 2 of 12 SQuAD 2.0 questions right with the gold passage alone)


@register("position-distill")
class PositionDistill(Objective):
    OPTIONS = {"documents": 20, "words": 100, "teacher": "first", "student": "middle", "target": "gold", "hold": 0.0}
    needs_data = True

    def check(self):
        o = self.options
        if o["documents"] < 3 or o["words"] < 10:
            raise PearError("position-distill: need documents >= 3 (first, middle, last) and words >= 10")
        if o["teacher"] not in TEACHERS:
            raise PearError(f"position-distill: teacher must be one of {', '.join(TEACHERS)}, got '{o['teacher']}'")
        if o["student"] not in STUDENTS:
            raise PearError(f"position-distill: student must be one of {', '.join(STUDENTS)}, got '{o['student']}'")
        if o["target"] not in TARGETS:
            raise PearError(f"position-distill: target must be one of {', '.join(TARGETS)}, got '{o['target']}'")
        if not 0 <= o["hold"] < 1:
            raise PearError(f"position-distill: hold must be in [0, 1), got {o['hold']}")
        if o["hold"] and o["teacher"] == "oracle":
            raise PearError("position-distill: hold needs teacher=first or last (the oracle teacher reads one passage)")

    def batch(self, model, tokenizer, n: int, seed: int) -> list[Sequence]:
        """`n` (student, teacher) pairs. With target=teacher the model answers the teacher's
        prompts (the fit makes batches with the scales off: the base model answers)."""
        rng = random.Random(seed)
        if self.options["target"] == "gold":
            return [self._sequence(tokenizer, *self._draw(rng), None) for _ in range(n)]
        out, drawn = [], 0
        while len(out) < n:
            if drawn >= DRAWS * n:
                raise PearError(f"position-distill target=teacher: the model answered only {len(out)} of {drawn} "
                                f"SQuAD 2.0 questions correctly with the {self.options['teacher']} passage; "
                                "use target=gold")
            missing = n - len(out)  # draw for what is missing at the rate seen so far (a round is one generation)
            want = 2 * missing if not drawn else math.ceil(1.2 * missing * drawn / max(len(out), 1))
            draws = [self._draw(rng) for _ in range(min(want, DRAWS * n - drawn))]
            drawn += len(draws)
            prompts = [encode(tokenizer, self._teacher(*d[:2])[0], "")[0] for d in draws]  # the teacher's, token ids
            for d, p, a in zip(draws, prompts, teacher_answers(model, tokenizer, prompts)):
                text = tokenizer.decode(a, skip_special_tokens=True)
                if qa_score(text, list(d[0].answers)):
                    out.append(self._sequence(tokenizer, *d, answer=(a, text), p_teacher=p))
        return out[:n]

    def _draw(self, rng: random.Random):
        """A question, its distractors and the student's gold index (the teacher's with probability
        `hold`; no draw for it at hold 0, so the other recipes' batches stay as they were)."""
        o = self.options
        item, distractors = squad.sample(self.data_dir, o["words"], o["documents"], rng)
        if o["hold"] and rng.random() < o["hold"]:
            return item, distractors, len(distractors) if o["teacher"] == "last" else 0
        gold = rng.randrange(1, o["documents"] - 1) if o["student"] == "middle" else rng.randrange(o["documents"])
        return item, distractors, gold

    def _teacher(self, item, distractors) -> tuple[str, int, int]:
        """The teacher's prompt, its gold passage's index and its number of passages: the gold
        passage first, last, or alone."""
        from ..evaluate.prompts import qa_prompt

        others = [] if self.options["teacher"] == "oracle" else distractors
        gold = len(others) if self.options["teacher"] == "last" else 0
        return qa_prompt(item.question, squad_docs(item, others, gold)), gold, len(others) + 1

    def _sequence(self, tokenizer, item, distractors, gold, answer: tuple[list[int], str] | None = None,
                  p_teacher: list[int] | None = None) -> Sequence:
        """The pair, its answer SQuAD's gold span or `answer` (the teacher's own tokens and text);
        `p_teacher`: the teacher's prompt ids where they are made already."""
        from ..evaluate.prompts import qa_prompt

        student = qa_prompt(item.question, squad_docs(item, distractors, gold))
        teacher, teacher_gold, teacher_docs = self._teacher(item, distractors)
        if answer is None:
            p_student, a = encode(tokenizer, student, item.answers[0])
            text, extra = item.answers[0], {}
        else:
            (a, text), p_student = answer, encode(tokenizer, student, "")[0]
            extra = {"gold_answers": list(item.answers)}
        p_teacher = encode(tokenizer, teacher, "")[0] if p_teacher is None else p_teacher
        return Sequence(p_student + list(a), len(a), teacher_ids=p_teacher + list(a),
                        meta={"gold_index": gold, "teacher_gold_index": teacher_gold, "teacher_documents": teacher_docs,
                              "answer": text, **extra})

    def loss(self, model, batch, scaling):
        pad = pad_id_of(None)
        n = [s.n_target for s in batch]
        with torch.no_grad(), scaling.disabled():
            teacher, _, _ = answer_logprobs(model, [s.teacher_ids for s in batch], n, pad)  # (B, A, V)
        student, _, m = answer_logprobs(model, [s.ids for s in batch], n, pad)
        kl = (teacher.exp() * (teacher - student)).sum(-1) * m  # (B, A)
        return (kl.sum(1) / m.sum(1)).mean()


def teacher_answers(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """The model's greedy answer to each prompt (token ids), as the evaluation decodes it, in the
    evaluation's batches (`batch_limits`), up to the end of its first line or of its turn, that
    last token included (so the student also learns where the answer stops), at most ANSWER_TOKENS."""
    from ..evaluate.generate import batch_limits, eos_token_ids, greedy_generate

    eos = eos_token_ids(model, tokenizer)
    rows, tokens = batch_limits(model)

    def done(_i, new):  # EOS is kept: the eos set given to the loop is empty
        return new[-1] in eos or "\n" in tokenizer.decode(new, skip_special_tokens=True)

    with torch.no_grad():
        return greedy_generate(model, prompts, pad_id=pad_id_of(tokenizer), eos_ids=set(), max_new_tokens=ANSWER_TOKENS,
                               device=model.get_input_embeddings().weight.device, batch_size=rows,
                               max_batch_tokens=tokens, done=done)
