"""Evaluation: long-context tasks registered by name, several models on the same examples.

    from pear.evaluate import evaluate, save_results
    results = evaluate(["smollm2-135m", ("smollm2-135m", "ms-poe")], ["mdqa-10", "closedbook"], limit=50)
    save_results(results, "results/eval.json")

Tasks (`pear eval --list-tasks`): mdqa-K (lost in the middle, K documents), oracle (= mdqa-1),
kv / kv-N (key-value retrieval), hotpotqa, closedbook, mmlu / mmlu-5shot. A new task is a
function decorated with `@register_task(name)` that returns a `Task` of `Example`s.
"""

from .registry import BuildContext, Example, Task, build_task, register_task  # noqa: F401
from .report import save_results  # noqa: F401
from .runner import ModelEntry, evaluate  # noqa: F401
from .scoring import run_task  # noqa: F401

__all__ = ["BuildContext", "Example", "Task", "build_task", "register_task", "ModelEntry", "evaluate",
           "run_task", "save_results"]
