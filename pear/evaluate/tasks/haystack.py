"""Haystacks for the needle tasks (`passkey`, `copy`): runs of whole sentences, cut from a text.

A haystack is `n_words` words of consecutive sentences starting at a seeded sentence of the
text; a gold item is then placed at one of `N_SLOTS` depths (slot 1 = the start, slot
`N_SLOTS` = the end). The same builders make the evaluation examples (over the essays of
the data folder) and the study's training sequences (over other passages), so the format a
model learns and the format it is tested on are the same, while the text never is.
"""

from __future__ import annotations

import random
import re

from ...errors import PearError
from .. import data

ESSAYS = "haystack/PaulGrahamEssays.json.gz"
N_SLOTS = 11  # depths 0 %, 10 %, ..., 100 %
DEFAULT_POSITIONS = ["first", "25%", "middle", "75%", "last"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> "Sentences":
    """Sentences with their white space collapsed; empty pieces dropped."""
    out = []
    for s in _SENTENCE_END.split(text):
        s = " ".join(s.split())
        if s:
            out.append(s)
    return Sentences(out)


def essay_sentences(data_dir) -> Sentences:
    return split_sentences(data.read_json(data.data_file(data_dir, ESSAYS))["text"])


class Sentences(list):
    """A list of sentences that knows its total word count (checked once per task)."""

    def __init__(self, sentences):
        super().__init__(sentences)
        self.n_words = sum(len(x.split()) for x in self)


def haystack(sentences: Sentences, n_words: int, rng: random.Random) -> list[str]:
    """Consecutive sentences from a seeded start, together at least `n_words` words."""
    if n_words < 1:
        raise PearError(f"haystack length must be >= 1 word, got {n_words}")
    if sentences.n_words < 2 * n_words:
        raise PearError(f"haystack of {n_words} words: the text has only {sentences.n_words} words")
    while True:  # a start near the end of the text may not leave enough words: draw again
        i, out, words = rng.randrange(len(sentences)), [], 0
        while i < len(sentences) and words < n_words:
            out.append(sentences[i])
            words += len(sentences[i].split())
            i += 1
        if words >= n_words:
            return out


def slot_index(slot: int, n_items: int, n_slots: int = N_SLOTS) -> int:
    """0-based index among `n_items` places for 0-based depth `slot` of `n_slots`."""
    return round(slot * (n_items - 1) / (n_slots - 1)) if n_slots > 1 else 0


def parse_words(name: str, param: str | None, default: int) -> int:
    if param is None:
        return default
    if not param.isdigit() or int(param) < 1:
        raise PearError(f"{name}-{param}: the parameter is the haystack length in words, e.g. {name}-{default}")
    return int(param)


def setup(name: str, param: str | None, ctx, default_words: int):
    """What every haystack task starts from: (words per haystack, the essays' sentences, the
    gold slots asked for, the task's random generator)."""
    from ..registry import resolve_positions

    return (parse_words(name, param, default_words), essay_sentences(ctx.data_dir),
            resolve_positions(ctx.positions or DEFAULT_POSITIONS, N_SLOTS), random.Random(ctx.seed))
