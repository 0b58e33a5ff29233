"""HotpotQA, distractor setting: 10 paragraphs (2 gold, 8 distractors) per question.

The two gold paragraphs (those named in `supporting_facts`), in their original order, are
moved together to each requested position (default: start, middle, end; the position is
that of the first gold paragraph, 1..9); distractors keep their order. The 29 development
records with fewer than 10 paragraphs are left out (counted in `info`). Same QA prompt and
metric as multi-document QA (best_subspan_em on the first line).
"""

from __future__ import annotations

from .. import data
from ..metrics import QA_DONE_ON, qa_done, qa_score
from ..prompts import qa_prompt
from ..registry import BuildContext, Example, Task, register_task, resolve_positions, take

N_PARAGRAPHS = 10
DEFAULT_POSITIONS = ["first", "middle", "last"]


def paragraphs(record: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(gold, distractors) as (title, text), each in original order."""
    gold_titles = {t for t, _ in record["supporting_facts"]}
    paras = [(t, "".join(s).strip()) for t, s in record["context"]]
    return [p for p in paras if p[0] in gold_titles], [p for p in paras if p[0] not in gold_titles]


@register_task("hotpotqa", "HotpotQA distractor setting, the 2 gold paragraphs moved to start/middle/end")
def hotpotqa(param: str | None, ctx: BuildContext) -> Task:
    from ...errors import PearError

    if param is not None:
        raise PearError("hotpotqa takes no parameter")
    records = data.read_json(data.data_file(ctx.data_dir, data.HOTPOTQA))
    kept = [r for r in records if len(r["context"]) == N_PARAGRAPHS and len(paragraphs(r)[0]) == 2]
    kept = take(kept, ctx.limit, ctx.half)
    positions = resolve_positions(ctx.positions or DEFAULT_POSITIONS, N_PARAGRAPHS - 1)
    examples = []
    for r in kept:
        gold, rest = paragraphs(r)
        for p in positions:
            docs = rest[:p] + gold + rest[p:]
            examples.append(Example(id=r["_id"], condition=str(p + 1), prompt=qa_prompt(r["question"], docs),
                                    answers=[r["answer"]], meta={"gold_index": p, "type": r["type"]}))
    return Task(name="hotpotqa", kind="generate", examples=examples, metric="best_subspan_em",
                score=lambda out, ex: qa_score(out, ex.answers), done=lambda out, ex: qa_done(out),
                done_on=QA_DONE_ON,
                max_new_tokens=100, positional=True,
                info={"records": len(kept), "left_out_fewer_paragraphs": len(records) - len(
                    [r for r in records if len(r["context"]) == N_PARAGRAPHS]),
                      "positions": [p + 1 for p in positions], "file": data.HOTPOTQA})
