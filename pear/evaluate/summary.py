"""Per task, model and condition: accuracy, count and 95 % Wilson interval; each model
against the first one on the examples both scored: paired bootstrap and exact McNemar
(`stats`). A model with a missing part (`--parts only`) is left out, not half-counted."""

from __future__ import annotations

from .registry import Task
from .stats import compare, wilson


def _acc(scores: list[float]) -> dict:
    n, k = len(scores), float(sum(scores))
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else None, "n": n, "correct": int(k),
            "ci95": [lo, hi] if n else None}


def summarise(task: Task, labels: list[str], records: dict[str, list[dict]], *, n_resamples: int, seed: int) -> dict:
    conds = task.conditions + (["all"] if len(task.conditions) > 1 else [])
    out = {"metric": task.metric, "kind": task.kind, "positional": task.positional, "conditions": conds,
           "info": task.info, "models": {}, "paired": {}}
    for lab in (x for x in labels if x in records):  # a label with a missing part (parts="only") is left out
        m = {}
        for c in conds:
            rs = [r for r in records[lab] if c == "all" or r["condition"] == c]
            m[c] = _acc([r["score"] for r in rs if r["score"] is not None])
            m[c]["skipped"] = sum(r["score"] is None for r in rs)
        if any("subject" in e.meta for e in task.examples):
            subj: dict[str, list[float]] = {}
            for e, r in zip(task.examples, records[lab]):
                if r["score"] is not None:
                    subj.setdefault(e.meta["subject"], []).append(r["score"])
            m["subjects"] = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(subj.items())}
            m["macro_accuracy"] = sum(v["accuracy"] for v in m["subjects"].values()) / max(1, len(subj))
        out["models"][lab] = m
    first = labels[0]  # the reference of every paired test: no reference, no tests
    ref = {(r["id"], r["condition"]): r["score"] for r in records.get(first, [])}
    for lab in (x for x in labels[1:] if x in records and ref):
        cmp = {}
        for c in conds:
            pairs = [(ref[(r["id"], r["condition"])], r["score"]) for r in records[lab]
                     if (c == "all" or r["condition"] == c) and r["score"] is not None
                     and ref.get((r["id"], r["condition"])) is not None]
            cmp[c] = compare([a for a, _ in pairs], [b for _, b in pairs], n_resamples, seed)
        out["paired"][lab] = {"against": first, "conditions": cmp}
    return out
