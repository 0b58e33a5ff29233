"""MMLU, multiple choice by the log-likelihood of the answer letter (" A".." D").

lm-evaluation-harness's default `mmlu` format; `mmlu` is 0-shot, `mmlu-5shot` puts the
subject's first 5 dev examples before each question. No chat template: the letter is scored
as the direct continuation of "Answer:", as the harness does by default. Accuracy over all
questions and per subject. `--limit N` takes N questions round-robin over the subjects, so
a small limit still covers many subjects.
"""

from __future__ import annotations

import re

from ...errors import PearError
from .. import data
from ..prompts import LETTERS, mmlu_prompt
from ..registry import BuildContext, Example, Task, register_task, take


@register_task("mmlu", "MMLU test, letter log-likelihood, 0-shot (mmlu-5shot: 5 dev examples)")
def mmlu(param: str | None, ctx: BuildContext) -> Task:
    m = re.fullmatch(r"(\d+)(shot)?", param or "0")
    if not m:
        raise PearError(f"mmlu-{param}: use mmlu (0-shot) or mmlu-Kshot, e.g. mmlu-5shot")
    k = int(m.group(1))
    test = data.read_mmlu(ctx.data_dir, "test")
    dev = data.read_mmlu(ctx.data_dir, "dev") if k else {}
    if any(len(dev.get(s, [])) < k for s in test):
        raise PearError(f"mmlu-{k}shot: some subjects have fewer than {k} dev examples")
    per_subject = [[Example(id=f"{s}/{i}", condition="all", prompt=mmlu_prompt(s, q, c, dev.get(s, [])[:k]),
                            answers=[LETTERS[a]], meta={"subject": s, "answer": a})
                    for i, (q, c, a) in enumerate(rows)] for s, rows in test.items()]
    longest = max(map(len, per_subject))
    interleaved = [lst[i] for i in range(longest) for lst in per_subject if i < len(lst)]
    examples = take(interleaved, ctx.limit, ctx.half)
    return Task(name=f"mmlu-{k}shot" if k else "mmlu", kind="choice", examples=examples, metric="accuracy",
                chat=False, choices=[f" {x}" for x in LETTERS],
                info={"shots": k, "questions": len(examples), "subjects": len({e.meta["subject"] for e in examples})})
