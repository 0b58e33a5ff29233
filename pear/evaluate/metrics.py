"""Answer metrics, exactly as the reference implementations compute them.

`best_subspan_em` is the metric of "Lost in the Middle" (Liu et al., 2023;
nelson-liu/lost-in-the-middle `metrics.py` and `evaluate_qa_responses.py`): SQuAD
normalisation of the *first line* of the output, then 1 if any normalised gold answer is a
substring of it. It is a substring test on characters, so the gold "1" matches "1972":
that quirk is kept on purpose, for comparability with published numbers.

KV retrieval (reference `evaluate_kv_responses.py`) scores the whole output: 1 if the gold
value appears in it, case-insensitive.
"""

from __future__ import annotations

import re
import string

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop a/an/the, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def first_line(output: str) -> str:
    """What the QA metric reads: everything before the first newline, stripped.

    The reference cuts here so that a model cannot win by copying the whole context. An
    output that *starts* with a newline therefore scores 0, as in the reference.
    """
    return output.split("\n")[0].strip()


def best_subspan_em(prediction: str, ground_truths: list[str]) -> float:
    pred = normalize_answer(prediction)
    for gt in ground_truths:
        if normalize_answer(gt) in pred:
            return 1.0
    return 0.0


def qa_score(output: str, answers: list[str]) -> float:
    """best_subspan_em on the first line of a raw model output."""
    return best_subspan_em(first_line(output), answers)


QA_DONE_ON = "\n"  # qa_done turns true at the token that brings the first newline (Task.done_on)


def qa_done(output: str) -> bool:
    """True once more tokens cannot change `qa_score`: the first line is complete."""
    return QA_DONE_ON in output


def kv_score(output: str, value: str) -> float:
    return 1.0 if value.lower() in output.lower() else 0.0


def contains_answer(text: str, answers: list[str], whole_words: bool = False) -> bool:
    """Whether a passage could hand the model an answer: any non-empty normalised answer is a
    substring of the normalised passage (the test the metric applies to outputs), or, with
    `whole_words`, appears in it as whole words (the test of the DPR-style `hasanswer`)."""
    t = normalize_answer(text)
    norm = [a for a in (normalize_answer(x) for x in answers) if a]
    if whole_words:
        t = f" {t} "
        return any(f" {a} " in t for a in norm)
    return any(a in t for a in norm)
