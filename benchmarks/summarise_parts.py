r"""Summarise `pear eval` per-example parts that no results JSON covers (a run cut off by the
machine's time limit, or a call killed before it wrote its JSON).

    python benchmarks/summarise_parts.py PARTS_DIR --task mdqa-20 --labels base pear \
        [--first-tokens 2686] [--keep-partial] [--out partial.json]

`pear eval --parts-dir DIR` saves each (label, task) in parts of at most 2048 examples
(cache.PART_SIZE), in the task's example order, as LABEL__TASK__KEY.json.gz with
{"label", "task", "seconds", "records": [{"id", "condition", "score", "n_prompt_tokens", ...}]}.
The key hashes the model files and prompts, so the parts of two models evaluated under the same
label ("base", "pear") lie side by side and only their records tell them apart. This script:

1. chains each label's parts into runs. A part boundary usually falls inside an item (2048 is
   not a multiple of the 3 or 5 conditions per item), so part k+1 starts with the remaining
   conditions of part k's last item, with the same prompt length (one item's prompts differ
   only in the order of its passages; the length is the model's tokenizer's). Where a boundary
   falls between items (every 3rd part of a 3-condition task), a loose part is joined only if
   it is the label's single loose part and there is a single run to extend (a note says so);
   otherwise it stays a piece, paired on its own. A run killed after k parts is the first k
   parts of the full run.
2. pairs each run of another label with a run of the first label that has the same examples
   for the same model: identical (id, condition, n_prompt_tokens) over their common prefix
   (two models' tokenizers give different prompt lengths). Among several, the longest common
   prefix wins, then the run of the same length (the partner from the same call).
3. keeps that common prefix, trimmed to whole items (all conditions of an id present, so each
   gold position covers the same questions) unless --keep-partial.
4. prints and saves, per condition, accuracy with its 95 % Wilson interval and the paired test
   against the first label (pear.evaluate.stats.compare: paired bootstrap, exact McNemar),
   with the same defaults as `pear eval` (10,000 resamples, seed 0).

--first-tokens N keeps only the pairs whose first example has N prompt tokens (one model).
With a single label, each of its runs is summarised alone (accuracy and interval only).
"""

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

from pear.evaluate.stats import compare, wilson

PART_SIZE = 2048  # pear.evaluate.cache.PART_SIZE


def load_parts(parts_dir, task, label):
    """[(file name, records, seconds)] for one label and task."""
    out = []
    for f in sorted(Path(parts_dir).glob(f"*__{task}__*.json.gz")):
        with gzip.open(f, "rt") as fh:
            part = json.load(fh)
        if part["label"] == label and part["task"] == task:
            out.append((f.name, part["records"], part["seconds"]))
    return out


def follows(prev, nxt):
    """Does part `nxt` continue part `prev` of the same run?"""
    last, first = prev[-1], nxt[0]
    return (len(prev) == PART_SIZE and first["id"] == last["id"]
            and first["n_prompt_tokens"] == last["n_prompt_tokens"]
            and not any(r["id"] == last["id"] and r["condition"] == first["condition"] for r in prev[-10:]))


def chain(parts, start):
    """Group a label's parts into runs: [{"parts": [names], "records": [...], "seconds"}], in order.
    `start` is the task's first (id, condition): a run that does not begin there is a piece."""
    nxt = {}
    for i, (_, a, _) in enumerate(parts):
        cand = [j for j, (_, b, _) in enumerate(parts) if j != i and follows(a, b)]
        if len(cand) > 1:
            sys.exit(f"ambiguous chain after {parts[i][0]}: {[parts[j][0] for j in cand]}")
        if cand:
            nxt[i] = cand[0]
    while True:  # a boundary between items: join only where there is a single candidate
        heads = [i for i in range(len(parts)) if i not in nxt.values()]
        orphans = [i for i in heads if (parts[i][1][0]["id"], parts[i][1][0]["condition"]) != start]
        open_tails = [i for i in range(len(parts)) if i not in nxt and len(parts[i][1]) == PART_SIZE]
        if len(orphans) != 1 or len(open_tails) != 1 or orphans[0] == open_tails[0]:
            break
        print(f"note: {parts[orphans[0]][0]} joined after {parts[open_tails[0]][0]} "
              "(part boundary between items; the only candidate)")
        nxt[open_tails[0]] = orphans[0]
    runs = []
    for i in range(len(parts)):
        if i in nxt.values():
            continue  # not the first part of a run
        names, recs, secs = [], [], 0.0
        while i is not None:
            names.append(parts[i][0])
            recs += parts[i][1]
            secs += parts[i][2]
            i = nxt.get(i)
        if (recs[0]["id"], recs[0]["condition"]) != start:
            print(f"note: {names} is a piece of a run (its start could not be found); paired on its own")
        runs.append({"parts": names, "records": recs, "seconds": secs})
    return runs


def task_start(parts_dir, task):
    """The (id, condition) that begins the most parts of the task: its first example."""
    firsts = Counter()
    for f in Path(parts_dir).glob(f"*__{task}__*.json.gz"):
        with gzip.open(f, "rt") as fh:
            r = json.load(fh)["records"][0]
        firsts[(r["id"], r["condition"])] += 1
    return firsts.most_common(1)[0][0]


def signature(records):
    return [(r["id"], r["condition"], r["n_prompt_tokens"]) for r in records]


def common_prefix(a, b):
    n = min(len(a["records"]), len(b["records"]))
    return n if signature(a["records"][:n]) == signature(b["records"][:n]) else 0


def whole_items(records, conditions):
    """The ids whose every condition is among `records`."""
    seen = Counter(r["id"] for r in records)
    return {i for i, k in seen.items() if k == len(conditions)}


def accuracy(scores):
    k, n = float(sum(scores)), len(scores)
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else float("nan"), "n": n, "correct": int(k), "ci95": [lo, hi]}


def summarise_pair(ref_label, ref, label, run, n, keep_partial):
    """Accuracy per condition of both runs on their first n examples, and the paired test."""
    a, b = ref["records"][:n], run["records"][:n]
    conditions = list(dict.fromkeys(r["condition"] for r in a))
    dropped = 0
    if not keep_partial and len(conditions) > 1:
        keep = whole_items(a, conditions)
        dropped = sum(r["id"] not in keep for r in a)
        a, b = [r for r in a if r["id"] in keep], [r for r in b if r["id"] in keep]
    ids = list(dict.fromkeys(r["id"] for r in a))
    out = {"labels": [ref_label, label], "first_prompt_tokens": a[0]["n_prompt_tokens"],
           "parts": {ref_label: ref["parts"], label: run["parts"]},
           "run_examples": {ref_label: len(ref["records"]), label: len(run["records"])},
           "run_seconds": {ref_label: round(ref["seconds"], 2), label: round(run["seconds"], 2)},
           "examples": len(a), "dropped_partial_item_examples": dropped,
           "items": len(ids), "first_item": ids[0], "last_item": ids[-1], "conditions": {}}
    for c in conditions + (["all"] if len(conditions) > 1 else []):
        pairs = [(x["score"], y["score"]) for x, y in zip(a, b) if c in ("all", x["condition"])]
        both = [(x, y) for x, y in pairs if x is not None and y is not None]
        out["conditions"][c] = {
            ref_label: accuracy([x for x, _ in pairs if x is not None]),
            label: accuracy([y for _, y in pairs if y is not None]),
            "paired": compare([x for x, _ in both], [y for _, y in both], 10_000, 0),
        }
    return out


def summarise_run(label, run):
    """One label alone (no partner): accuracy per condition of one run."""
    recs = run["records"]
    conditions = list(dict.fromkeys(r["condition"] for r in recs))
    ids = list(dict.fromkeys(r["id"] for r in recs))
    out = {"labels": [label], "first_prompt_tokens": recs[0]["n_prompt_tokens"], "parts": {label: run["parts"]},
           "run_examples": {label: len(recs)}, "run_seconds": {label: round(run["seconds"], 2)},
           "examples": len(recs), "items": len(ids), "first_item": ids[0], "last_item": ids[-1], "conditions": {}}
    for c in conditions + (["all"] if len(conditions) > 1 else []):
        out["conditions"][c] = {label: accuracy([r["score"] for r in recs
                                                 if c in ("all", r["condition"]) and r["score"] is not None])}
    return out


def fmt(m):
    return f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f},{m['ci95'][1]:.3f}] n={m['n']}"


def report(task, res):
    """Print one pair (or one run) as a table: a row per condition."""
    labels = res["labels"]
    print(f"\n{task}: {' vs '.join(reversed(labels))}; first prompt {res['first_prompt_tokens']} tokens; "
          f"{res['examples']} examples = {res['items']} items {res['first_item']}..{res['last_item']}")
    print(f"  runs: {res['run_examples']} examples, {res['run_seconds']} s; "
          f"dropped {res.get('dropped_partial_item_examples', 0)} examples of a cut item")
    print(f"{'cond':>5}" + "".join(f"  {lab:>24}" for lab in labels)
          + (f"  {'diff':>7}  {'p_mcnemar':>9}  {'p_boot':>7}" if len(labels) == 2 else ""))
    for c, row in res["conditions"].items():
        line = f"{c:>5}" + "".join(f"  {fmt(row[lab]):>24}" for lab in labels)
        if "paired" in row:
            p = row["paired"]
            line += f"  {p['diff']:+.4f}  {p['p_mcnemar']:9.2g}  {p['p_bootstrap']:7.3g}"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts_dir")
    ap.add_argument("--task", required=True)
    ap.add_argument("--labels", nargs="+", required=True, help="reference label first, then the others")
    ap.add_argument("--first-tokens", type=int, help="only the pairs whose first example has this many prompt tokens")
    ap.add_argument("--keep-partial", action="store_true", help="keep an item cut by the end of the shorter run")
    ap.add_argument("--out", help="save the pairs as JSON")
    args = ap.parse_args()

    ref_label = args.labels[0]
    start = task_start(args.parts_dir, args.task)
    ref_runs = chain(load_parts(args.parts_dir, args.task, ref_label), start)
    results = []
    if len(args.labels) == 1:  # one label: each of its runs alone
        results = [summarise_run(ref_label, r) for r in ref_runs
                   if args.first_tokens in (None, r["records"][0]["n_prompt_tokens"])]
    for label in args.labels[1:]:
        for run in chain(load_parts(args.parts_dir, args.task, label), start):
            if args.first_tokens is not None and run["records"][0]["n_prompt_tokens"] != args.first_tokens:
                continue
            cands = [(common_prefix(r, run), len(r["records"]) == len(run["records"]), r) for r in ref_runs]
            cands = [c for c in cands if c[0] > 0]
            if not cands:
                print(f"{label}: run {run['parts']} has no '{ref_label}' run on the same examples")
                continue
            n, _, ref = max(cands, key=lambda c: c[:2])
            results.append(summarise_pair(ref_label, ref, label, run, n, args.keep_partial))

    for res in results:
        report(args.task, res)
    if args.out:
        meta = {"parts_dir": args.parts_dir, "task": args.task, "labels": args.labels,
                "first_tokens": args.first_tokens, "keep_partial": args.keep_partial,
                "command": "python benchmarks/summarise_parts.py " + " ".join(sys.argv[1:])}
        Path(args.out).write_text(json.dumps({"settings": meta, "pairs": results}, indent=1) + "\n")
        print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
