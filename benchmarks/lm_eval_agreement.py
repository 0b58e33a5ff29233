r"""Compare `pear eval --log-samples` with lm-evaluation-harness runs of the exported tasks.

    pear eval --task oracle,closedbook,mmlu --limit 6 --export-lm-eval /tmp/lmx
    lm_eval ... --include_path /tmp/lmx --tasks pear_oracle,pear_closedbook --apply_chat_template \
            --log_samples --output_path /tmp/lmx_out/gen
    lm_eval ... --include_path /tmp/lmx --tasks pear_mmlu --log_samples --output_path /tmp/lmx_out/mc
    pear eval --model SAME --dtype fp32 --task oracle,closedbook,mmlu --limit 6 --log-samples --out /tmp/lmx_out/pear.json
    python benchmarks/lm_eval_agreement.py /tmp/lmx_out/pear.json /tmp/lmx_out

Per task: examples compared, identical rendered prompts, identical outputs (QA: the first
line, which is all the metric reads; KV: pear's output, which stops once the value is out,
is a prefix of the harness's; MMLU: the chosen letter), identical scores, and both
accuracies. Prints a Markdown table.
"""

import gzip
import json
import sys
from pathlib import Path


def main(pear_json: str, lm_dir: str) -> int:
    res = json.loads(Path(pear_json).read_text())
    samples = [json.loads(x) for x in gzip.open(Path(pear_json).with_name(res["samples_file"]), "rt")]
    ours = {(s["task"], s["id"], s["condition"]): s for s in samples}
    print("| task | n | same prompt | same output | same score | pear acc | lm-eval acc |")
    print("|---|---|---|---|---|---|---|")
    for f in sorted(Path(lm_dir).rglob("samples_pear_*.jsonl")):
        rows = [json.loads(x) for x in open(f)]
        task = rows[0]["doc"].get("task") or f.name[len("samples_pear_"):].rsplit("_20", 1)[0].split("_pos")[0]
        same_p = same_o = same_s = 0
        acc_p = acc_l = 0.0
        for r in rows:
            d = r["doc"]
            s = ours[(task, d["id"], d["condition"])]
            if "target" in d:  # multiple choice: argmax of the log-likelihoods
                ll = [float(x[0][0]) for x in r["resps"]]
                letter = "ABCD"[max(range(4), key=ll.__getitem__)]
                score_l = r["acc"]
                same_p += r["arguments"]["gen_args_0"]["arg_0"] == s["prompt"]
                same_o += letter == s["output"]
            else:
                out_l = r["filtered_resps"][0]
                score_l = r["score"]
                same_p += r["arguments"]["gen_args_0"]["arg_0"] == s["prompt"]
                if task.startswith("kv"):  # pear stops once the value is out: a prefix of the harness's
                    same_o += out_l.startswith(s["output"])
                else:
                    same_o += out_l.split("\n")[0].strip() == s["output"].split("\n")[0].strip()
            same_s += score_l == s["score"]
            acc_p += s["score"]
            acc_l += score_l
        n = len(rows)
        print(f"| {f.name.split('_20')[0][len('samples_'):]} | {n} | {same_p}/{n} | {same_o}/{n} | {same_s}/{n} "
              f"| {acc_p / n:.3f} | {acc_l / n:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
