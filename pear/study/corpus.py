"""Training data of the position-embedding study: real text mixed with in-context retrieval.

Text: the passages of the data folder that the study's evaluations do not read — the NQ
oracle passages, the SQuAD 2.0 contexts and the HotpotQA paragraphs (Wikipedia, ~8M
tokens; `mdqa.distractor_pool` reads them, deduplicated, in a fixed order). The study
evaluates on the essays (passkey, copy) and on freshly generated UUIDs (kv), never on these.

Retrieval sequences, so that copying circuits form in a few minutes of training: the
evaluation tasks' own builders (`kv_prompt`, `passkey_prompt`, `copy_example`) applied to
training text and to UUIDs from a different seed stream, each followed by its answer. Sizes
and gold positions are drawn uniformly, so any position bias the models show is their own.

Repeated spans, so that induction heads form at all: a first training run of the study
(2,000 steps × 32 windows of text and the three retrieval kinds) left all three models without
them — a 100-token span of training text shown twice was predicted only somewhat better the
second time (loss 3.3 → 2.5) and repeated random tokens not at all. A `repeat` document is a
span shown twice: random token ids from the whole vocabulary (the proxy's own shape) or a piece
of training text, half each; every token of its second half is a copying target.

Every window is a pure function of ``(seed, index)``: the same windows whatever the number
of data-loader workers, and a held-out set from a separate stream. A window starts at a
document boundary; documents are separated by the tokenizer's end-of-text token; a
retrieval document that does not fit in what is left of the window is replaced by text, so
no answer is ever cut off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PearError
from ..evaluate import data
from ..evaluate.prompts import kv_prompt
from ..evaluate.tasks.copy import copy_example
from ..evaluate.tasks.haystack import N_SLOTS, Sentences, haystack, split_sentences
from ..evaluate.tasks.kv import make_kv_records, move_gold
from ..evaluate.tasks.passkey import new_key, passkey_prompt

POOL = "nq+squad+hotpotqa"
DEFAULT_MIX = {"text": 0.35, "repeat": 0.2, "copy": 0.15, "kv": 0.2, "passkey": 0.1}
REPEAT_TOKENS = (16, 256)  # length range of one half of a `repeat` document
HELDOUT_STREAM = 1_000_003  # held-out windows come from seeds far from the training ones


def training_passages(data_dir, max_passages: int | None = None) -> list[str]:
    from ..evaluate.tasks.mdqa import distractor_pool

    passages, _ = distractor_pool(data.resolve_data_dir(data_dir), POOL)
    texts = [" ".join(t.split()) for _, t in passages]
    return texts[:max_passages] if max_passages else texts


def parse_mix(text: str | None) -> dict[str, float]:
    """"text=0.4,kv=0.2,..." -> weights (normalised); None -> DEFAULT_MIX."""
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        try:
            mix[k.strip()] = float(v)
        except ValueError:
            raise PearError(f"--mix: bad weight in '{part}'; use e.g. text=0.35,repeat=0.2,copy=0.15,kv=0.2,passkey=0.1") from None
    bad = [k for k in mix if k not in DEFAULT_MIX]
    if bad or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0 or mix.get("text", 0) <= 0:
        raise PearError(f"--mix {text!r}: kinds are {', '.join(DEFAULT_MIX)} with weights >= 0, and text > 0")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


@dataclass
class TrainingMix(torch.utils.data.Dataset):
    """Windows of `context` token ids; `TrainingMix(...)[i]` is window i (a LongTensor (T,))."""

    tokenizer: object
    passages: list[str]
    context: int
    seed: int = 0
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    n_windows: int = 1
    stream: int = 0  # 0: training windows, HELDOUT_STREAM: held-out ones

    def __post_init__(self):
        if self.context < 64:
            raise PearError(f"study context must be >= 64 tokens, got {self.context}")
        if not self.passages:
            raise PearError("no training passages")
        self.sep = self.tokenizer.eos_token_id
        enc = self.tokenizer(self.passages, add_special_tokens=False)["input_ids"]
        self.break_ids = self.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        # one flat array of every passage followed by a blank line; a text piece is a slice of it
        self.starts = np.cumsum([0] + [len(x) + len(self.break_ids) for x in enc[:-1]])
        brk = np.asarray(self.break_ids, dtype=np.int64)
        self.flat = np.concatenate([a for x in enc for a in (np.asarray(x, dtype=np.int64), brk)])
        self.sentences = Sentences(s for p in self.passages for s in split_sentences(p))
        # haystack sizes in words that leave room for the instruction and the answer
        self.max_words = max(20, int(0.55 * self.context))
        self.max_pairs = max(2, self.context // 90)
        if self.sentences.n_words < 2 * self.max_words:
            raise PearError(f"{self.sentences.n_words} words of training text: too few for a {self.context}-token context")

    def __len__(self) -> int:
        return self.n_windows

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.stream}/{i}")

    def _text(self, rng: random.Random, n_tokens: int) -> list[int]:
        """`n_tokens` of consecutive passages (joined by a blank line) from a random start."""
        start = int(self.starts[rng.randrange(len(self.starts))])
        piece = self.flat[start: start + n_tokens]
        if len(piece) < n_tokens:  # wrap around to the first passage
            piece = np.concatenate([piece, self.flat[: n_tokens - len(piece)]])
        return piece.tolist()

    def document(self, kind: str, rng: random.Random) -> str:
        """One retrieval document (prompt + answer) of `kind`: copy, kv or passkey."""
        if kind == "kv":
            n = rng.randint(2, self.max_pairs)
            rec = make_kv_records(1, n, seed=rng.getrandbits(64))[0]
            pairs = move_gold(rec["ordered_kv_records"], rec["key"], rng.randrange(n))
            return f"{kv_prompt(pairs, rec['key'])} {rec['value']}"
        words = rng.randint(20, self.max_words)
        slot = rng.randrange(N_SLOTS)
        if kind == "passkey":
            key = new_key(rng)
            return f"{passkey_prompt(haystack(self.sentences, words, rng), key, slot)} {key}."
        if kind == "copy":
            for _ in range(20):
                made = copy_example(haystack(self.sentences, words, rng), slot)
                if made is not None:
                    return f'{made[0]} {made[1]}"'
            raise PearError("training text: no sentence usable for a copy document")
        raise PearError(f"unknown document kind {kind}")

    def repeat(self, rng: random.Random, room: int) -> list[int] | None:
        """A span shown twice (+ separator) that fits in `room` tokens; None if none fits."""
        lo, hi = REPEAT_TOKENS
        if room < 2 * lo + 1:
            return None
        n = rng.randint(lo, min(hi, (room - 1) // 2))
        span = ([rng.randrange(len(self.tokenizer)) for _ in range(n)] if rng.random() < 0.5
                else self._text(rng, n))
        return span + span + [self.sep]

    def window(self, i: int) -> tuple[list[int], dict[str, int]]:
        """Token ids of window i and the tokens per kind in it."""
        rng = self._rng(i)
        kinds, weights = list(self.mix), list(self.mix.values())
        ids: list[int] = []
        counts = dict.fromkeys(DEFAULT_MIX, 0)
        while len(ids) < self.context:
            room = self.context - len(ids)
            kind = rng.choices(kinds, weights)[0]
            doc = None
            if kind == "repeat":
                doc = self.repeat(rng, room)
                kind = kind if doc else "text"
            elif kind != "text":
                doc = self.tokenizer(self.document(kind, rng), add_special_tokens=False)["input_ids"] + [self.sep]
                if len(doc) > room:
                    doc, kind = None, "text"
            if doc is None:
                doc = self._text(rng, min(room, rng.randint(64, self.context))) + [self.sep]
            counts[kind] += min(len(doc), room)
            ids += doc
        return ids[: self.context], counts

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.window(i)[0], dtype=torch.long)

    def heldout(self, n: int) -> "TrainingMix":
        """`n` windows from the held-out stream (same text, other draws)."""
        other = TrainingMix.__new__(TrainingMix)
        other.__dict__.update(self.__dict__, n_windows=n, stream=HELDOUT_STREAM)
        return other
