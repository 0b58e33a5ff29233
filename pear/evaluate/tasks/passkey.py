"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit number hidden in unrelated text.

`passkey-N` hides the needle sentence "The pass key is 71432. Remember it. 71432 is the pass
key." at each requested depth of an N-word haystack of essays (default 500 words), then asks
for it. Scored 1 if the first number in the output is the pass key. Small models can do it
(it is pure retrieval and copying), so it shows position effects where open QA cannot.
"""

from __future__ import annotations

import random
import re

from ..registry import BuildContext, Example, Task, register_task, take
from .haystack import ESSAYS, N_SLOTS, haystack, setup, slot_index

DEFAULT_WORDS = 500
RECORDS = 300
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
_NUMBER = re.compile(r"\d+")


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(sentences: list[str], key: str, slot: int, n_slots: int = N_SLOTS) -> str:
    """The haystack with the needle inserted before sentence `slot_index(slot, ...)`."""
    i = slot_index(slot, len(sentences) + 1, n_slots)
    text = " ".join(sentences[:i] + [needle(key)] + sentences[i:])
    return f"{INSTRUCTION}\n\n{text}\n\n{QUESTION}"


def passkey_score(output: str, key: str) -> float:
    m = _NUMBER.search(output)
    return 1.0 if m is not None and m.group(0) == key else 0.0


def new_key(rng: random.Random) -> str:
    return str(rng.randrange(10_000, 100_000))


@register_task("passkey", "pass key hidden in an essay haystack at each depth (passkey-N: N words, default 500)")
def passkey(param: str | None, ctx: BuildContext) -> Task:
    words, sentences, slots, rng = setup("passkey", param, ctx, DEFAULT_WORDS)
    records = take([(haystack(sentences, words, rng), new_key(rng)) for _ in range(RECORDS)], ctx.limit)
    examples = [Example(id=f"passkey{i}", condition=str(s + 1), prompt=passkey_prompt(hs, key, s),
                        answers=[key], meta={"slot": s + 1, "depth": s / (N_SLOTS - 1)})
                for i, (hs, key) in enumerate(records) for s in slots]
    return Task(name="passkey", kind="generate", examples=examples, metric="first_number_is_key",
                score=lambda out, ex: passkey_score(out, ex.answers[0]),
                done=lambda out, ex: _NUMBER.search(out) is not None and not out.rstrip()[-1:].isdigit(),
                max_new_tokens=12, chat=True, positional=True,
                info={"words": words, "records": len(records), "slots": N_SLOTS, "source": ESSAYS,
                      "positions": [s + 1 for s in slots]})

