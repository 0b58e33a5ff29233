"""Long-range copying: continue, word for word, a sentence that appeared earlier in the context.

`copy-N` shows an N-word haystack of essays (default 500 words), then the first
`PREFIX_WORDS` words of one of its sentences, the gold sentence, taken at each requested
depth; the model must go on with the sentence's next `ANSWER_WORDS` words. The prefix occurs
once in the haystack, so the continuation is determined by the context alone. Scored 1 if
the output, normalised (SQuAD: lower case, no punctuation or articles), starts with the
normalised continuation. This is the proxy task's skill (copying from far back) on real text.
It is a continuation task, so the prompt is never wrapped in a chat template (an instruct
model answering in a chat turn restates the prompt instead of continuing it).
"""

from __future__ import annotations

from ...errors import PearError
from ..metrics import normalize_answer
from ..registry import BuildContext, Example, Task, register_task
from .haystack import ESSAYS, N_SLOTS, haystack, setup, slot_index

DEFAULT_WORDS = 500
RECORDS = 300
PREFIX_WORDS = 6
ANSWER_WORDS = 8
INSTRUCTION = "Read the text below. You will be asked to go on with one of its sentences, word for word."
QUESTION = "Continue the sentence from the text above:"


def copy_example(sentences: list[str], slot: int, n_slots: int = N_SLOTS) -> tuple[str, str] | None:
    """(prompt, continuation) with the gold sentence nearest to depth `slot` that is long
    enough and whose prefix occurs once in the haystack; None if no sentence qualifies."""
    text = " ".join(sentences)
    target = slot_index(slot, len(sentences), n_slots)
    for i in sorted(range(len(sentences)), key=lambda j: (abs(j - target), j)):
        words = sentences[i].split()
        if len(words) < PREFIX_WORDS + ANSWER_WORDS:
            continue
        prefix = " ".join(words[:PREFIX_WORDS])
        if text.count(prefix) != 1:
            continue
        answer = " ".join(words[PREFIX_WORDS: PREFIX_WORDS + ANSWER_WORDS])
        return f'{INSTRUCTION}\n\n{text}\n\n{QUESTION} "{prefix}', answer
    return None


def copy_score(output: str, answer: str) -> float:
    out, gold = normalize_answer(output), normalize_answer(answer)
    return 1.0 if gold and (out + " ").startswith(gold + " ") else 0.0


@register_task("copy", "continue a sentence seen earlier in an essay haystack, gold at each depth (copy-N: N words)")
def copy(param: str | None, ctx: BuildContext) -> Task:
    words, sentences, slots, rng = setup("copy", param, ctx, DEFAULT_WORDS)
    n = RECORDS if ctx.limit is None else min(RECORDS, ctx.limit)
    examples, tries = [], 0
    while len(examples) < n * len(slots):
        tries += 1
        if tries > 20 * n:
            raise PearError(f"copy-{words}: too few haystacks with a usable gold sentence at every depth")
        hs = haystack(sentences, words, rng)
        made = [copy_example(hs, s) for s in slots]
        if any(m is None for m in made):
            continue
        rec = len(examples) // len(slots)
        examples += [Example(id=f"copy{rec}", condition=str(s + 1), prompt=p, answers=[a],
                             meta={"slot": s + 1, "depth": s / (N_SLOTS - 1)})
                     for s, (p, a) in zip(slots, made)]
    return Task(name="copy", kind="generate", examples=examples, metric="continues_sentence",
                score=lambda out, ex: copy_score(out, ex.answers[0]),
                done=lambda out, ex: len(out.split()) > ANSWER_WORDS,
                max_new_tokens=4 * ANSWER_WORDS, chat=False, positional=True,
                info={"words": words, "records": n, "slots": N_SLOTS, "prefix_words": PREFIX_WORDS,
                      "answer_words": ANSWER_WORDS, "source": ESSAYS, "positions": [s + 1 for s in slots]})
