"""``retrieval``: in-context retrieval with the answer at a uniformly random position.

``source=squad`` (default): a SQuAD 2.0 question, its passage at a uniformly random index
among ``documents`` passages (`squad`), in the multi-document QA prompt format, rendered
with the tokenizer's chat template when it has one; loss = cross-entropy of the gold answer.
``source=kv``: a JSON object of ``pairs`` fresh random UUID key-value pairs (the format of
the key-value retrieval task, never its records), the queried key at a uniformly random
index; loss on the value. ``source=mix``: each sequence draws one of the two.

``gold=inner`` draws the gold index from the inner three fifths of the context only (for 20
passages, positions 5-16), where models read worst ("lost in the middle"), so that the scales
learn what the middle lacks rather than raising every position alike; ``gold=uniform``
(default) draws it from all of them.
"""

from __future__ import annotations

import random
import uuid

from ..errors import PearError
from . import Objective, Sequence, pad_id_of, register, squad, target_nll

SOURCES = ("squad", "kv", "mix")
GOLDS = ("uniform", "inner")


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as the evaluation renders the prompt (chat template when the
    tokenizer has one, special tokens then come from the template)."""
    from ..evaluate.prompts import has_chat_template, render

    chat = has_chat_template(tokenizer)
    p = tokenizer(render(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"]
    a = tokenizer(answer if chat else " " + answer, add_special_tokens=False)["input_ids"]
    return list(p), list(a)


def squad_docs(item, distractors, gold: int) -> list[tuple[str, str]]:
    return distractors[:gold] + [(item.title, item.text)] + distractors[gold:]


@register("retrieval")
class Retrieval(Objective):
    OPTIONS = {"source": "squad", "documents": 20, "words": 100, "pairs": 50, "gold": "uniform"}
    needs_data = True

    def check(self):
        o = self.options
        if o["source"] not in SOURCES:
            raise PearError(f"retrieval: source must be one of {', '.join(SOURCES)}, got '{o['source']}'")
        if o["gold"] not in GOLDS:
            raise PearError(f"retrieval: gold must be one of {', '.join(GOLDS)}, got '{o['gold']}'")
        if o["documents"] < 1 or o["words"] < 10 or o["pairs"] < 1:
            raise PearError("retrieval: need documents >= 1, words >= 10, pairs >= 1")
        self.needs_data = o["source"] != "kv"

    def batch(self, model, tokenizer, n: int, seed: int) -> list[Sequence]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            src = self.options["source"]
            if src == "mix":
                src = rng.choice(["squad", "kv"])
            prompt, answer, gold = self._squad(rng) if src == "squad" else self._kv(rng)
            p, a = encode(tokenizer, prompt, answer)
            out.append(Sequence(p + a, len(a), meta={"source": src, "gold_index": gold, "answer": answer}))
        return out

    def _squad(self, rng: random.Random) -> tuple[str, str, int]:
        from ..evaluate.prompts import qa_prompt

        o = self.options
        item, distractors = squad.sample(self.data_dir, o["words"], o["documents"], rng)
        gold = self._gold(rng, o["documents"])
        return qa_prompt(item.question, squad_docs(item, distractors, gold)), item.answers[0], gold

    def _kv(self, rng: random.Random) -> tuple[str, str, int]:
        from ..evaluate.prompts import kv_prompt

        pairs = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                  str(uuid.UUID(int=rng.getrandbits(128), version=4))) for _ in range(self.options["pairs"])]
        gold = self._gold(rng, len(pairs))
        k, v = pairs[gold]
        return kv_prompt(pairs, k), v, gold

    def _gold(self, rng: random.Random, n: int) -> int:
        """Index of the gold item among n: any, or (gold=inner) one of the inner three fifths."""
        edge = n // 5 if self.options["gold"] == "inner" else 0
        return rng.randrange(edge, n - edge)

    def loss(self, model, batch, scaling):
        return target_nll(model, batch, pad_id_of(None))
