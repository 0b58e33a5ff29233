r"""Export our tasks as lm-evaluation-harness task configs (YAML + local JSONL files).

    pear eval --task mdqa-10,kv,mmlu --limit 50 --export-lm-eval DIR
    lm_eval --model hf --model_args pretrained=MODEL_FOLDER,dtype=float32 --include_path DIR \
            --tasks pear --apply_chat_template --batch_size 8 --log_samples --output_path OUT

Each (task, gold position) becomes one harness task, `pear_<task>_pos<k>` (or `pear_<task>`),
grouped under the tag `pear`. The JSONL files hold our exact prompts (the distractors are
chosen by pear, so the harness does not rebuild them); `pear_utils.py` scores with
pear.evaluate.metrics, so both tools share one metric. Generation tasks stop at the first
newline (the metric reads only the first line), KV at EOS; MMLU is multiple choice on
" A".." D" after "Answer:" (the harness's own mmlu format).

Pass `--apply_chat_template` for instruct models on the generation tasks, as pear does
(`--chat auto`); MMLU is scored without a chat template in pear, so run it in a separate
harness call without that flag. The files are derived data: write them outside the
repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PearError
from .registry import BuildContext, Task, build_task

UTILS = '''"""Scoring for pear's exported tasks: pear's own metric functions."""
from pear.evaluate.metrics import kv_score, qa_score


def process_qa(doc, results):
    return {"score": qa_score(results[0], doc["answers"])}


def process_kv(doc, results):
    return {"score": kv_score(results[0], doc["answers"][0])}
'''


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def task_yaml(name: str, data_file: Path, task: Task) -> str:
    head = [f"task: {name}", "tag:", "  - pear", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {_yaml_str(str(data_file.resolve()))}", "test_split: test", 'doc_to_text: "{{prompt}}"']
    if task.kind == "choice":
        body = ["output_type: multiple_choice", "doc_to_choice: " + json.dumps([c.strip() for c in task.choices]),
                'doc_to_target: "{{target}}"', 'target_delimiter: " "',
                "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]
    else:
        until = ["\n"] if task.metric == "best_subspan_em" else []
        fn = "process_qa" if task.metric == "best_subspan_em" else "process_kv"
        body = ["output_type: generate_until", 'doc_to_target: "{{answers[0]}}"', "generation_kwargs:",
                f"  until: {json.dumps(until)}", "  do_sample: false", f"  max_gen_toks: {task.max_new_tokens}",
                f"process_results: !function pear_utils.{fn}",
                "metric_list:", "  - metric: score", "    aggregation: mean", "    higher_is_better: true"]
    return "\n".join(head + body + ["metadata:", "  version: 1.0"]) + "\n"


def export(tasks: list[str], out_dir, ctx: BuildContext) -> list[str]:
    """Write configs and data for `tasks` into `out_dir`; return the harness task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pear_utils.py").write_text(UTILS)
    names = []
    for t in tasks:
        task = build_task(t, ctx)
        if task.kind == "generate" and task.metric not in ("best_subspan_em", "value_in_output"):
            raise PearError(f"task {task.name} ({task.metric}) cannot be exported to lm-eval-harness yet")
        for cond in task.conditions:
            name = f"pear_{task.name}" + (f"_pos{cond}" if cond != "all" and len(task.conditions) > 1 else "")
            exs = [e for e in task.examples if e.condition == cond]
            f = out / f"{name}.jsonl"
            with open(f, "w", encoding="utf-8") as fh:
                for e in exs:
                    row = {"id": e.id, "condition": e.condition, "prompt": e.prompt, "answers": e.answers}
                    if task.kind == "choice":
                        row["target"] = "ABCD".index(e.answers[0])
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            (out / f"{name}.yaml").write_text(task_yaml(name, f, task))
            names.append(name)
    return names
