"""A screen of folded candidates (no fit of their own): the recipe study's rule and tables for them.

    python3 benchmarks/fold_screen.py --work W --model smollm2-135m --names W/names.json

A fold-only round (BENCHMARKS.md §5, round 14) folds fitted coefficients on some layers at some
strength (`pear fold --layers --strength`) and evaluates every candidate beside the base in one
`pear eval` per task, with labels short enough for file names; `names.json` says which recipe each
label is ({"L0-4+15-19_x2": "last-self-distill-channels@fold_layers=0-4+15-19,strength=2", ...}; a
report-half label adds "-seed1"). From the per-example parts in W/parts (no model needed) this
writes, under the recipes' names, as `recipe_study.py` does:

* screen_paired.json: every candidate against the base on the screen (mdqa-20, half 1);
* selection.json: the rule of rounds 8-14 — chosen if Δ ≥ +3 points, Δ with answers cut to 20
  words ≥ +3 (W/length_check_h1.json, `answer_length.py`) and MMLU (half 1, the guard) Δ ≥ −0.5
  points; among those the largest Δ; none: paper (the guard need only be measured for the candidates
  that pass the first two);
* report_paired.json: the report half (half 2: mdqa-20, kv, closed-book, MMLU) where its parts are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_study import (FINAL_TASKS, GOAL_DELTA, GUARD_MIN, SCREEN_Q, SCREEN_TASK, _paired,  # noqa: E402
                          _records, half_examples)

RULE = ("per model: among the candidates with Δ ≥ +3 points on mdqa-20 half 1, Δ ≥ +3 with answers cut to "
        "20 words and MMLU (half 1, 2,000 questions) Δ ≥ −0.5 points, the largest Δ; else paper")
GUARD = ("mmlu", 2000)


def paired(work: Path, model: str, task: str, half: int, limit: int | None, names: dict, data_dir) -> dict:
    """{recipe name: paired row} of `task`'s evaluation on `half` (the first `limit` items), from the parts,
    for the labels `names` names (the parts may hold more: two rounds screened in one evaluation)."""
    examples = half_examples(data_dir, task, limit, half)
    by_label = _records(work, task, [model], lambda of: of == len(examples), examples).get(model, {})
    by_label = {lab: recs for lab, recs in by_label.items() if lab == "base" or lab in names}
    if "base" not in by_label or len(by_label) < 2:
        return {}
    return {names[lab]: row for lab, row in _paired(by_label, f"{model} {task}").items()}


def select(screen: dict, guard: dict, cut: dict) -> str:
    """The rule; the guard is needed only for the candidates that pass the screen and the cut."""
    passing = [r for r, v in screen.items() if v["diff"] >= GOAL_DELTA - 1e-9 and cut[r] >= GOAL_DELTA - 1e-9]
    missing = [r for r in passing if r not in guard]
    if missing:
        raise RuntimeError(f"the guard ({GUARD[0]}, half 1) is missing for {', '.join(missing)}")
    allowed = [r for r in passing if guard[r]["diff"] >= GUARD_MIN - 1e-9]
    return max(allowed, key=lambda r: (screen[r]["diff"], -screen[r]["gap"]), default="paper")


def main(argv=None) -> int:
    from pear.evaluate.data import resolve_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--names", required=True, type=Path, help="JSON: {label: recipe name}")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    names = json.loads(a.names.read_text())
    data_dir = resolve_data_dir(a.data_dir)
    m, w = a.model, a.work

    screen = paired(w, m, SCREEN_TASK, 1, SCREEN_Q, names, data_dir)
    if not screen:
        print(f"error: no screen of {m} in {w}/parts", file=sys.stderr)
        return 1
    (w / "screen_paired.json").write_text(json.dumps({f"{m}/{r}": v for r, v in screen.items()}, indent=1) + "\n")
    guard = paired(w, m, GUARD[0], 1, GUARD[1], names, data_dir)
    length = json.loads((w / "length_check_h1.json").read_text())[m]
    cut = {names[lab]: v["by_words"]["20"]["diff"] for lab, v in length.items() if lab in names}
    chosen = select(screen, guard, cut)
    sel = {"rule": RULE, "models": [m], "delta": {m: {r: v["diff"] for r, v in screen.items()}},
           "guard": {"task": GUARD[0], "delta": {m: {r: v["diff"] for r, v in guard.items()}}},
           "length": {"words": 20, "delta": {m: cut}}, "chosen": {m: chosen}}
    (w / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
    print(f"{m}: chosen {chosen}")

    report = {t: paired(w, m, t, 2, lim, names, data_dir) for t, lim in FINAL_TASKS}
    report = {t: rows for t, rows in report.items() if rows}
    if report:
        (w / "report_paired.json").write_text(json.dumps({m: report}, indent=1) + "\n")
        for t, rows in report.items():
            print(t, {r: round(100 * v["diff"], 1) for r, v in rows.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
