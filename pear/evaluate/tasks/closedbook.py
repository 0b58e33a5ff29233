"""Closed-book NQ: the multi-document QA questions with no documents at all.

Tells retrieval from memory: a model that answers here already knew the answer. Prompt and
metric as in Lost in the Middle (`closedbook_qa.prompt`, best_subspan_em on the first line).
"""

from __future__ import annotations

from ...errors import PearError
from .. import data
from ..metrics import QA_DONE_ON, qa_done, qa_score
from ..prompts import closedbook_prompt
from ..registry import BuildContext, Example, Task, register_task, take
from .mdqa import load_oracle


@register_task("closedbook", "the NQ questions of mdqa without any document (memory only)")
def closedbook(param: str | None, ctx: BuildContext) -> Task:
    if param is not None:
        raise PearError("closedbook takes no parameter")
    qs = take(load_oracle(ctx.data_dir), ctx.limit, ctx.half)
    examples = [Example(id=f"q{i}", condition="all", prompt=closedbook_prompt(q["question"]), answers=q["answers"])
                for i, q in enumerate(qs)]
    return Task(name="closedbook", kind="generate", examples=examples, metric="best_subspan_em",
                score=lambda out, ex: qa_score(out, ex.answers), done=lambda out, ex: qa_done(out),
                done_on=QA_DONE_ON,
                max_new_tokens=100, info={"questions": len(qs), "file": data.NQ_ORACLE})
