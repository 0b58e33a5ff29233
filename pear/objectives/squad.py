"""Multi-passage questions from SQuAD 2.0, in the multi-document QA format.

SQuAD 2.0 is used by no evaluation task (those read NQ, HotpotQA, KV-75 and MMLU), so the
objectives may train on it. Each item: an answerable question, its paragraph trimmed to
``words`` words around the answer (about the length of the NQ passages the evaluation uses),
and distractors: paragraphs of *other* articles, trimmed the same way, that contain none of
the answers (the test the QA metric applies).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from ..errors import PearError


@dataclass(frozen=True)
class Item:
    question: str
    answers: tuple[str, ...]
    title: str
    text: str


def _trim(context: str, start: int | None, words: int) -> str:
    w = context.split()
    if len(w) <= words:
        return " ".join(w)
    if start is None:
        return " ".join(w[:words])
    at = len(context[:start].split())  # word index of the answer's start
    lo = max(0, min(at - words // 3, len(w) - words))
    return " ".join(w[lo:lo + words])


def path(data_dir):
    """The SQuAD 2.0 file in the data folder (--data-dir, else $PEAR_DATA), or one clear error."""
    from ..evaluate import data

    return data.data_file(data.resolve_data_dir(data_dir or None), data.SQUAD)


@functools.lru_cache(maxsize=4)
def load(data_dir: str, words: int) -> tuple[list[Item], list[tuple[str, str]]]:
    """(answerable items, all trimmed paragraphs as (title, text)), in file order."""
    from ..evaluate import data

    f = path(data_dir)
    articles = data.read_json(f)["data"]
    items, paragraphs = [], []
    for art in articles:
        title = art["title"].replace("_", " ")
        for p in art["paragraphs"]:
            paragraphs.append((title, _trim(p["context"], None, words)))
            for qa in p["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                a0 = qa["answers"][0]
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                text = _trim(p["context"], a0["answer_start"], words)
                if a0["text"] not in text:
                    continue
                items.append(Item(qa["question"].strip(), answers, title, text))
    if not items:
        raise PearError(f"no answerable SQuAD 2.0 questions in {f}")
    return items, paragraphs


DISTRACTOR_DRAWS = 2000  # per item, before it is passed over
ITEM_DRAWS = 100  # items passed over in a row before the file is judged too small


def sample(data_dir, words: int, documents: int, rng: random.Random) -> tuple[Item, list[tuple[str, str]]]:
    """One item and documents - 1 distractors from other articles (random order). An item whose
    answer is in nearly every passage (a one-letter answer is a substring of all of them) is
    passed over after DISTRACTOR_DRAWS draws for another one, instead of drawing for ever; a file
    where ITEM_DRAWS items in a row find no distractors is too small for `documents`."""
    from ..evaluate.metrics import contains_answer

    items, paragraphs = load(str(data_dir) if data_dir else "", words)
    for _ in range(ITEM_DRAWS):
        item = items[rng.randrange(len(items))]
        answers = list(item.answers)
        out: list[tuple[str, str]] = []
        seen = set()
        for _ in range(DISTRACTOR_DRAWS):
            if len(out) == documents - 1:
                break
            i = rng.randrange(len(paragraphs))
            t, x = paragraphs[i]
            if i in seen or t == item.title or contains_answer(f"{t} {x}", answers):
                continue
            seen.add(i)
            out.append((t, x))
        if len(out) == documents - 1:
            return item, out
    raise PearError(f"{path(data_dir)}: too few passages without the answer in other articles for "
                    f"{documents} documents per prompt ({ITEM_DRAWS} questions tried)")
