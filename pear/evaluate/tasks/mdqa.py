"""Multi-document QA, "lost in the middle" (Liu et al., 2023), rebuilt from the NQ oracle file.

For each question: the gold passage plus K-1 distractors, gold inserted at each requested
position. Distractors are other questions' gold passages (optionally also SQuAD and HotpotQA
paragraphs) that contain none of the question's answers, ranked by BM25 against the
question, most relevant first (the original ranked Contriever retrievals the same way).
Ties are broken by a seeded shuffle. The ranking is cached per (data files, pool, seed) in
the pear cache folder. `mdqa-1` is the oracle setting (the gold passage alone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np

from ...atomic import write_text
from ...errors import PearError
from ...loading import cache_dir
from .. import data
from ..metrics import QA_DONE_ON, contains_answer, qa_done, qa_score
from ..prompts import qa_prompt
from ..registry import BuildContext, Example, Task, register_task, resolve_positions, take

DEFAULT_DOCS = 10
DEFAULT_POSITIONS = ["0%", "25%", "50%", "75%", "100%"]
MAX_DISTRACTORS = 49  # cached per question; enough for K <= 50
POOLS = ("nq", "squad", "hotpotqa")
_CACHE_VERSION = 2
log = logging.getLogger("pear")


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def load_oracle(data_dir) -> list[dict]:
    """[{question, answers, title, text}] in file order."""
    rows = data.read_jsonl(data.data_file(data_dir, data.NQ_ORACLE))
    return [{"question": r["question"], "answers": r["answers"],
             "title": r["ctxs"][0]["title"], "text": r["ctxs"][0]["text"]} for r in rows]


def distractor_pool(data_dir, pool: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(passages as (title, text), data files used). Deduplicated, in a fixed order."""
    parts = pool.split("+")
    bad = [p for p in parts if p not in POOLS]
    if bad or "nq" not in parts:
        raise PearError(f"distractor pool '{pool}': use nq, optionally +squad and/or +hotpotqa")
    passages, files = [], [data.NQ_ORACLE]
    passages += [(r["title"], r["text"]) for r in load_oracle(data_dir)]
    if "squad" in parts:
        files.append(data.SQUAD)
        for art in data.read_json(data.data_file(data_dir, data.SQUAD))["data"]:
            passages += [(art["title"].replace("_", " "), p["context"]) for p in art["paragraphs"]]
    if "hotpotqa" in parts:
        files.append(data.HOTPOTQA)
        for r in data.read_json(data.data_file(data_dir, data.HOTPOTQA)):
            passages += [(t, "".join(s).strip()) for t, s in r["context"]]
    return list(dict.fromkeys(passages)), files


class BM25:
    """rank_bm25's BM25Okapi scores, computed from postings lists instead of a Python loop
    over every document per query term (~100x faster on a 38k-passage pool; same numbers)."""

    def __init__(self, corpus: list[list[str]]):
        from rank_bm25 import BM25Okapi

        self.bm25 = bm = BM25Okapi(corpus)
        norm = bm.k1 * (1 - bm.b + bm.b * np.asarray(bm.doc_len) / bm.avgdl)  # (N,)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for d, freqs in enumerate(bm.doc_freqs):
            for term, tf in freqs.items():
                ds, tfs = postings.setdefault(term, ([], []))
                ds.append(d)
                tfs.append(tf)
        self.postings = {}
        for term, (ds, tfs) in postings.items():
            ds, tf = np.asarray(ds), np.asarray(tfs, dtype=np.float64)
            self.postings[term] = (ds, bm.idf[term] * tf * (bm.k1 + 1) / (tf + norm[ds]))
        self.n = len(corpus)

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n)
        for term in query:  # repeated query terms count again, as in BM25Okapi.get_scores
            if term in self.postings:
                ds, w = self.postings[term]
                out[ds] += w
        return out


def rank_distractors(questions: list[dict], passages: list[tuple[str, str]], seed: int,
                     n: int = MAX_DISTRACTORS) -> tuple[list[list[int]], list[int]]:
    """For each question, the indices of its top-n eligible passages by BM25, best first;
    and the questions that needed the whole-word test.

    Eligible: not the question's own gold passage, and containing none of its answers:
    normalised substring test on title + text (the test the metric applies to outputs).
    Where that leaves fewer than n passages (one-letter answers such as "S" occur in every
    passage), whole-word matches are excluded instead, as the original's `hasanswer` did.
    """
    scorer = BM25([_tokens(f"{t} {x}") for t, x in passages])
    rng = np.random.default_rng(seed)
    out, word_level = [], []
    for qi, q in enumerate(questions):
        scores = scorer.scores(_tokens(q["question"]))
        jitter = rng.permutation(len(passages))  # seeded tie-break
        order = np.lexsort((jitter, -scores))
        for whole_words in (False, True):
            chosen = []
            for i in order:
                t, x = passages[i]
                if (t, x) == (q["title"], q["text"]) or contains_answer(f"{t} {x}", q["answers"], whole_words):
                    continue
                chosen.append(int(i))
                if len(chosen) == n:
                    break
            if len(chosen) == n:
                break
        if whole_words:
            word_level.append(qi)
        out.append(chosen)
    return out, word_level


def cached_ranking(data_dir, pool: str, seed: int):
    """(questions, passages, ranking, whole-word questions); the ranking is cached on disk."""
    questions = load_oracle(data_dir)
    passages, files = distractor_pool(data_dir, pool)
    stamp = "|".join(data.file_stamp(data.data_file(data_dir, f)) for f in files)
    key = hashlib.sha256(f"{_CACHE_VERSION}|{pool}|{seed}|{MAX_DISTRACTORS}|{stamp}".encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"mdqa-distractors-{pool}-seed{seed}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached["ranking"]) == len(questions):
            return questions, passages, cached["ranking"], cached["word_level"]
    log.info("ranking distractors with BM25 (pool %s, %d passages); cached in %s", pool, len(passages), path)
    ranking, word_level = rank_distractors(questions, passages, seed)
    write_text(path, json.dumps({"ranking": ranking, "word_level": word_level}))
    return questions, passages, ranking, word_level


def build_mdqa(k: int, ctx: BuildContext) -> Task:
    if not 1 <= k <= MAX_DISTRACTORS + 1:
        raise PearError(f"mdqa: number of documents must be 1..{MAX_DISTRACTORS + 1}, got {k}")
    pool = ctx.options.get("distractor_pool", "nq")
    questions, passages, ranking, word_level = cached_ranking(ctx.data_dir, pool, ctx.seed)
    word_level = set(word_level)
    positions = resolve_positions(ctx.positions or DEFAULT_POSITIONS, k)
    examples = []
    chosen = take(list(enumerate(questions)), ctx.limit, ctx.half)
    for qi, q in chosen:
        distractors = [passages[i] for i in ranking[qi][: k - 1]]
        if len(distractors) < k - 1:
            raise PearError(f"mdqa: question {qi} has only {len(distractors)} eligible distractors")
        for p in positions:
            docs = distractors[:p] + [(q["title"], q["text"])] + distractors[p:]
            examples.append(Example(id=f"q{qi}", condition=str(p + 1), prompt=qa_prompt(q["question"], docs),
                                    answers=q["answers"],
                                    meta={"gold_index": p, "whole_word_exclusion": qi in word_level}))
    return Task(name=f"mdqa-{k}", kind="generate", examples=examples, metric="best_subspan_em",
                score=lambda out, ex: qa_score(out, ex.answers), done=lambda out, ex: qa_done(out),
                done_on=QA_DONE_ON,
                max_new_tokens=100, positional=k > 1,
                info={"documents": k, "distractor_pool": pool, "questions": len(chosen), "half": ctx.half,
                      "whole_word_exclusion": len(word_level & {qi for qi, _ in chosen}),
                      "positions": [p + 1 for p in positions], "file": data.NQ_ORACLE})


@register_task("mdqa", "multi-document QA (NQ), K documents (mdqa-K, default 10), gold at each position")
def mdqa(param: str | None, ctx: BuildContext) -> Task:
    if param is not None and not param.isdigit():
        raise PearError(f"mdqa-{param}: the parameter is the number of documents, e.g. mdqa-20")
    return build_mdqa(int(param) if param else DEFAULT_DOCS, ctx)


@register_task("oracle", "NQ questions with the gold passage alone (= mdqa-1)")
def oracle(param: str | None, ctx: BuildContext) -> Task:
    if param is not None:
        raise PearError("oracle takes no parameter")
    return build_mdqa(1, ctx)
