"""Tasks are data plus a few small functions, registered by name (as in lm-eval-harness).

A task *name* may carry one parameter after the first dash: `mdqa-20` is the `mdqa` builder
with parameter "20" (20 documents), `kv-140` generates 140-pair KV records, `mmlu-5shot`.

Each builder returns a `Task`: a list of `Example`s, each tagged with a *condition* (the
gold position, as a 1-based string, or "all" for tasks without positions), and how to score
it: `kind="generate"` (greedy decoding, then `score(output, example)`) or `kind="choice"`
(log-likelihood of each of `choices` as the next token; the highest is the prediction).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import PearError


@dataclass
class Example:
    id: str  # stable within its task: the same id means the same item for every model
    condition: str  # "1".."K" (1-based gold position) or "all"
    prompt: str  # user text, before any chat template
    answers: list[str]  # gold answers (or the gold value, or the gold letter)
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    kind: str  # "generate" | "choice"
    examples: list[Example]
    metric: str
    score: Callable[[str, Example], float] | None = None  # generate: score(output, example)
    done: Callable[[str, Example], bool] | None = None  # generate: True once the score is final
    done_on: str = ""  # generate: `done` can turn true only at a new token holding one of these characters
    max_new_tokens: int = 100
    chat: bool = True  # apply the chat template (instruct models)
    choices: list[str] = field(default_factory=list)  # choice: continuations, e.g. " A"
    positional: bool = False  # conditions are gold positions (plotted as a U-curve)
    info: dict = field(default_factory=dict)  # recorded in results: sizes, files, exclusions

    @property
    def conditions(self) -> list[str]:
        seen = dict.fromkeys(e.condition for e in self.examples)
        return sorted(seen, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


@dataclass
class BuildContext:
    data_dir: Path
    limit: int | None = None
    half: int | None = None  # 1 or 2: only the first or second half of the items (selection vs report)
    positions: list[str] | None = None  # None: each task's default
    seed: int = 0
    options: dict = field(default_factory=dict)  # task-specific, e.g. distractor_pool


TASKS: dict[str, Callable[[str | None, BuildContext], Task]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_task(name: str, description: str = ""):
    def deco(fn):
        TASKS[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn
    return deco


def _load_builtin() -> None:
    from .tasks import register_all

    register_all()


def split_task_name(name: str) -> tuple[str, str | None]:
    base, _, param = name.partition("-")
    return base, (param or None)


def build_task(name: str, ctx: BuildContext) -> Task:
    _load_builtin()
    base, param = split_task_name(name)
    if base not in TASKS:
        raise PearError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))} "
                        "(with a parameter: mdqa-20, kv-140, mmlu-5shot)")
    task = TASKS[base](param, ctx)
    task.name = name
    if not task.examples:
        raise PearError(f"task '{name}' has no examples (limit {ctx.limit})")
    return task


# ------------------------------------------------------------------ gold positions
POSITION_HELP = ("gold positions, comma-separated: 1-based integers, first, middle, last, or "
                 "percentages of the way (0%%,25%%,...); default per task")


def parse_positions(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    toks = [t.strip().lower() for t in spec.split(",") if t.strip()]
    for t in toks:
        if not (t in ("first", "middle", "last") or re.fullmatch(r"\d+", t) or re.fullmatch(r"\d+(\.\d+)?%", t)):
            raise PearError(f"bad position '{t}' in --positions; use 1-based integers, first, middle, last or N%")
    if not toks:
        raise PearError("--positions is empty")
    return toks


def resolve_position(token: str, n_slots: int) -> int:
    """0-based insert index among `n_slots` possible gold positions.

    Percentages round half down (50 % of 10 documents is document 5, as in Lost in the
    Middle's 1/5/10); "middle" is 50 %. Integers are 1-based and must fit.
    """
    if token == "first":
        return 0
    if token == "last":
        return n_slots - 1
    if token == "middle":
        token = "50%"
    if token.endswith("%"):
        frac = float(token[:-1]) / 100
        if not 0 <= frac <= 1:
            raise PearError(f"position {token} is outside 0%..100%")
        return int(math.ceil(frac * (n_slots - 1) - 0.5)) if frac > 0 else 0
    i = int(token)
    if not 1 <= i <= n_slots:
        raise PearError(f"position {i} is outside 1..{n_slots}; to mix tasks of different sizes, "
                        "use first, middle, last or N%")
    return i - 1


def resolve_positions(tokens: list[str], n_slots: int) -> list[int]:
    """Distinct 0-based indices, in increasing order. One slot (the oracle) has one position."""
    if n_slots == 1:
        return [0]
    return sorted({resolve_position(t, n_slots) for t in tokens})


def take(items: list, limit: int | None, half: int | None = None) -> list:
    """The items a run evaluates: the first or second half (`half` 1 or 2; the first half is
    the larger when the count is odd), then the first `limit` of those."""
    if half is not None:
        if half not in (1, 2):
            raise PearError(f"--half must be 1 or 2, got {half}")
        cut = (len(items) + 1) // 2
        items = items[:cut] if half == 1 else items[cut:]
    return items if limit is None else items[:limit]
