"""Length-controlled multi-document QA: is a gain better reading, or longer answers?

The QA metric (best_subspan_em, as in Lost in the Middle) asks whether a gold answer occurs in
the first line of the output, so a model that writes longer first lines wins more often without
reading any better. This script scores every variant of a recipe study's report half again with
its first line cut to its first N words (N = 20 and 10), from the per-example parts alone, and
pairs each variant with the base on the same examples (exact McNemar p). Uncut, the scores equal
the recorded ones (checked). Writes `length_check_h<half>.json` in the study folder.

    python3 benchmarks/answer_length.py --work benchmarks/results/recipe_study_round3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pear.evaluate.metrics import best_subspan_em, first_line  # noqa: E402
from pear.evaluate.stats import mcnemar_exact  # noqa: E402
from recipe_study import FINAL_TASKS, MODELS, _records  # noqa: E402

TASK = "mdqa-20"
WORDS = (None, 20, 10)  # None: the first line as the metric reads it


def score(output: str, answers, words: int | None) -> float:
    line = first_line(output)
    return best_subspan_em(" ".join(line.split()[:words]) if words else line, answers)


def length_check(work: Path, models: list[str], data_dir, half: int = 2, questions: int | None = None,
                 out_name: str | None = None) -> dict:
    """{model: {label: {"median_words", "by_words": {N: {"acc", "diff", "p"}}}}} for the variants of
    `TASK` on `half` whose parts are complete."""
    from pear.evaluate.registry import BuildContext, build_task

    questions = questions or dict(FINAL_TASKS)[TASK]
    task = build_task(TASK, BuildContext(Path(data_dir), limit=questions, half=half))
    answers = {(e.id, e.condition): e.answers for e in task.examples}
    n = len(task.examples)
    out: dict[str, dict] = {}
    for m, by_label in _records(work, TASK, models, lambda of: of == n, examples=set(answers)).items():
        if "base" not in by_label:
            continue
        keys = [(r["id"], r["condition"]) for r in by_label["base"]]
        scores = {}
        for label, recs in by_label.items():
            rec = {(r["id"], r["condition"]): r for r in recs}
            if set(rec) != set(keys):
                raise RuntimeError(f"{m} {label}: not the base's examples")
            s = {w: [score(rec[k]["output"], answers[k], w) for k in keys] for w in WORDS}
            if s[None] != [float(rec[k]["score"]) for k in keys]:
                raise RuntimeError(f"{m} {label}: rescoring does not reproduce the recorded scores")
            scores[label] = (s, statistics.median(len(first_line(rec[k]["output"]).split()) for k in keys))
        base = scores["base"][0]
        for label, (s, words) in scores.items():
            row = {"median_words": words, "by_words": {}}
            for w in WORDS:
                acc = sum(s[w]) / len(keys)
                cell = {"acc": acc}
                if label != "base":
                    cell.update(diff=acc - sum(base[w]) / len(keys), p=mcnemar_exact(base[w], s[w])[2])
                row["by_words"][str(w or "line")] = cell
            out.setdefault(m, {})[label] = row
    (work / (out_name or f"length_check_h{half}.json")).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a recipe study folder (its parts/)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--half", type=int, default=2, choices=[1, 2])
    p.add_argument("--questions", type=int, default=None, help=f"questions of that half (default: the report's, {dict(FINAL_TASKS)[TASK]})")
    p.add_argument("--data-dir", default=None, help="data folder (default $PEAR_DATA)")
    a = p.parse_args(argv)
    from pear.evaluate.data import resolve_data_dir

    out = length_check(Path(a.work), a.models.split(","), resolve_data_dir(a.data_dir), a.half, a.questions)
    print(f"| model | variant | median words | line: acc (Δ, p) | 20 words | 10 words |\n|---|---|---:|---|---|---|")
    for m, rows in out.items():
        for label, row in rows.items():
            cells = [f"{c['acc']:.3f}" + (f" ({100 * c['diff']:+.1f}, p={c['p']:.2g})" if "diff" in c else "")
                     for c in row["by_words"].values()]
            print(f"| {m} | {label} | {row['median_words']:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
