"""End to end: lm-evaluation-harness runs pear's exported tasks on the default model and agrees
with `pear eval`, example by example (rendered prompt, output, score).

lm_eval is an optional test dependency (`pip install -e ".[lm-eval]"`); without it the test is
skipped. The harness is run in-process on the already loaded model (HFLM accepts a model
object), a handful of examples: two short generation examples (closed-book NQ, chat template)
and three MMLU questions (log-likelihood of " A".." D", no chat template).
"""

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install -e '.[lm-eval]')")

from pear.evaluate.data import resolve_data_dir  # noqa: E402
from pear.evaluate.lm_eval_export import export  # noqa: E402
from pear.evaluate.registry import BuildContext  # noqa: E402
from pear.evaluate.runner import evaluate  # noqa: E402


def _harness(model, tokenizer, folder, tasks, chat, limit):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=limit, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                                  apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
    return out["samples"]


def _prompt(row) -> str:
    """The context the harness fed the model (in-process samples keep the request tuples; the
    files written by --log_samples turn them into {"gen_args_0": {"arg_0": ...}})."""
    args = row["arguments"]
    return args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]


@pytest.mark.real
@pytest.mark.data
def test_lm_eval_harness_agrees_with_pear_eval_on_the_default_model(tmp_path, smollm2, data_dir):
    limits = {"closedbook": 2, "mmlu": 3}
    ours = {}
    for task, n in limits.items():
        ctx = BuildContext(resolve_data_dir(str(data_dir)), limit=n, seed=0, options={"distractor_pool": "nq"})
        export([task], tmp_path / task, ctx)
        res = evaluate([smollm2], [task], data_dir=str(data_dir), limit=n, log_samples=True, progress=False,
                       batch_size=n, n_resamples=100)
        ours.update({(s["task"], s["id"]): s for s in res["samples"]})
    rows = {"closedbook": _harness(smollm2.model, smollm2.tokenizer, tmp_path / "closedbook", ["pear_closedbook"],
                                   True, 2)["pear_closedbook"],
            "mmlu": _harness(smollm2.model, smollm2.tokenizer, tmp_path / "mmlu", ["pear_mmlu"], False, 3)["pear_mmlu"]}
    assert [len(rows[t]) for t in limits] == list(limits.values())
    for task, rs in rows.items():
        for r in rs:
            s = ours[(task, r["doc"]["id"])]
            assert _prompt(r) == s["prompt"], "the harness reads the prompt pear reads"
            if task == "mmlu":  # the harness's argmax over the four log-likelihoods = pear's letter
                ll = [float(x[0][0]) for x in r["resps"]]
                assert "ABCD"[max(range(4), key=ll.__getitem__)] == s["output"]
                assert float(r["acc"]) == s["score"]
            else:  # the metric reads the first line
                assert r["filtered_resps"][0].split("\n")[0].strip() == s["output"].split("\n")[0].strip()
                assert float(r["score"]) == s["score"]
