"""Data parallelism on CPU: two processes (gloo) started by torchrun, on tiny models. Their
results must equal one process's: evaluation outputs example for example, fitted
coefficients within float tolerance."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

REPO = Path(__file__).resolve().parent.parent


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, target: tuple[str, ...] = ("-m", "pear")
             ) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m pear ARGS` (or another target: a script) with this
    checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PEAR_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 1000), *target] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def one_thread(fn, *a, **k):
    """Run in-process with one thread, as each launched process runs (OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*a, **k)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_folder(smollm2_bf16, tmp_path_factory):
    """A 2-layer random llama with SmolLM2's tokenizer, saved as a model folder."""
    tok = smollm2_bf16.tokenizer
    folder = tmp_path_factory.mktemp("dist") / "tiny"
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.data
def test_eval_two_processes_equals_one(tiny_folder, data_dir, tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m pear eval`: each rank scores half the batches, rank 0
    writes one results file whose per-example outputs, scores and summaries equal a single
    process's; its parts make a later run (here: one process) reuse everything."""
    from pear.cli import main
    from pear.evaluate import runner

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    args = ["eval", "--model", str(tiny_folder), "--task", "closedbook,mmlu", "--limit", "4", "--batch-size", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32", "--data-dir", str(data_dir),
            "--log-samples", "--no-progress", "--bootstrap", "100"]
    two = torchrun(args + ["--out", str(tmp_path / "two" / "e.json"), "--resume"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("results: ") == 1  # rank 0 alone reports and writes
    assert one_thread(main, args + ["--out", str(tmp_path / "one" / "e.json")]) == 0

    def read(d):
        with gzip.open(tmp_path / d / "e.samples.jsonl.gz", "rt") as f:
            return json.loads((tmp_path / d / "e.json").read_text()), [json.loads(x) for x in f]

    (r1, s1), (r2, s2) = read("one"), read("two")
    assert len(s1) == 8 and s1 == s2  # prompts, outputs, scores, choice log-probabilities
    assert r1["tasks"] == r2["tasks"] and r1["models"] == r2["models"]
    assert r2["settings"]["processes"] == 2 and r2["settings"]["hardware"]["processes"] == 2
    assert sorted(p.name.split("__")[1] for p in (tmp_path / "two" / "e.parts").iterdir()) == ["closedbook", "mmlu"]

    def boom(*a, **k):
        raise AssertionError("should have been reused")
    monkeypatch.setattr(runner, "run_task", boom)  # the two-process run's parts serve a later run
    assert one_thread(main, args + ["--out", str(tmp_path / "two" / "e.json"), "--resume"]) == 0
    again = json.loads((tmp_path / "two" / "e.json").read_text())
    assert again["tasks"] == r1["tasks"] and again["settings"]["processes"] == 1
    for res, n in ((r1, "1"), (r2, "2"), (again, "2")):  # which process count made each table's parts
        made = {t: x["parts_by_processes"] for t, x in next(iter(res["timing"].values())).items()}
        assert made == {"closedbook": {n: 1}, "mmlu": {n: 1}}


def test_eval_continuous_two_processes_equals_eager(tiny_folder, data_dir, tmp_path, monkeypatch):
    """`--decode continuous` under torchrun: each rank decodes its share of the prompts, rows
    joining as others finish; the outputs equal one eager process's (fp32)."""
    from pear.cli import main

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    args = ["eval", "--model", str(tiny_folder), "--task", "closedbook", "--limit", "6", "--batch-size", "2",
            "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32", "--data-dir", str(data_dir),
            "--log-samples", "--no-progress", "--bootstrap", "100"]
    two = torchrun(args + ["--decode", "continuous", "--out", str(tmp_path / "two" / "e.json")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one_thread(main, args + ["--out", str(tmp_path / "one" / "e.json")]) == 0

    def outputs(d):
        with gzip.open(tmp_path / d / "e.samples.jsonl.gz", "rt") as f:
            return [(x["id"], x["output"], x["score"]) for x in map(json.loads, f)]

    assert len(outputs("one")) == 6 and outputs("two") == outputs("one")
    assert json.loads((tmp_path / "two" / "e.json").read_text())["models"][0]["decode"] == "continuous"


def test_fit_two_processes_equals_one(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m pear fit`: each rank takes half of every proxy batch,
    the coefficients' gradients (and the penalty, once) are summed over ranks; the coefficients
    equal a one-process fit's to float tolerance, and only rank 0 writes."""
    from pear.cli import main
    from tiny_models import tiny_model

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    args = ["fit", "--model", str(folder), "--scales", "all-heads", "--steps", "4", "--batch", "6", "--length", "12",
            "--eval-batch", "4", "--lr", "0.1", "--penalty", "0.5", "--seed", "3", "--device", "cpu", "--dtype", "fp32",
            "--bounds", "none"]
    two = torchrun(args + ["--out", str(tmp_path / "two.json")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("fitted ") == 1
    assert one_thread(main, args + ["--out", str(tmp_path / "one.json")]) == 0

    def coefs(name):
        heads = json.loads((tmp_path / name).read_text())["heads"]
        return torch.tensor([h["coefficient"] for h in heads], dtype=torch.float64)

    one, dp = coefs("one.json"), coefs("two.json")
    assert len(one) == 8 and (one - 1).abs().max() > 1e-3  # they learned something
    torch.testing.assert_close(dp, one, rtol=0, atol=1e-5)
    assert not list(tmp_path.glob("*.ckpt"))


DISCOVER_ON_EACH_RANK = """
import json, sys
import torch
import pear.discover as D
import pear.discover.exact as DX
from pear import distributed
from pear.cli import main
from pear.loading import load_model

folder, out, top_m = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, rechecked = DX.ablate_heads, set()

def counted(model, clean, layer, heads, *a, **k):
    rechecked.update((layer, h) for h in heads)
    return real(model, clean, layer, heads, *a, **k)

DX.ablate_heads = counted
rc = main(["discover", "--model", folder, "--out", out + "/heads.json", "--method", "fast", "--top-m", str(top_m),
           "--settings", "4x8,6x6", "--k", "2", "--device", "cpu", "--dtype", "fp32", "--no-progress"])
mine = sorted(rechecked)
res = D.discover(load_model(folder, dtype="fp32", device="cpu").model, None, settings="4x8,6x6", method="fast",
                 top_m=top_m, k=2, progress=False)
r = distributed.rank()
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump({"rc": rc, "rechecked": mine, "result": res.to_dict()}, f)
distributed.end(0)
"""


def test_discover_two_processes_equals_one(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m pear discover`: the candidates' exact re-checks are split
    between the ranks (each re-runs its share, none twice), every rank ends with the whole
    result, rank 0 alone writes heads.json, and the heads and Δπ equal a single process's."""
    from pear.cli import main
    from tiny_models import tiny_model

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    script = tmp_path / "discover_each_rank.py"
    script.write_text(DISCOVER_ON_EACH_RANK)
    (tmp_path / "two").mkdir()
    two = torchrun([str(folder), str(tmp_path / "two"), "5"], tmp_path, target=(str(script),))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("fast discovery: ") == 1  # rank 0 alone reports and writes
    assert not list((tmp_path / "two").glob("*.ckpt*"))  # the ranks' resume files are removed
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    shares = [{tuple(h) for h in r["rechecked"]} for r in ranks]
    assert len(shares[0]) == 3 and len(shares[1]) == 2 and not shares[0] & shares[1]  # 5 heads, split

    args = ["discover", "--model", str(folder), "--method", "fast", "--top-m", "5", "--settings", "4x8,6x6",
            "--k", "2", "--device", "cpu", "--dtype", "fp32", "--no-progress"]
    assert one_thread(main, args + ["--out", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert shares[0] | shares[1] == {(h["layer"], h["head"]) for h in one["heads"] if h["exact"]}
    for dp in [json.loads((tmp_path / "two" / "heads.json").read_text())] + [r["result"] for r in ranks]:
        assert [(h["layer"], h["head"], h["exact"]) for h in dp["heads"]] == \
            [(h["layer"], h["head"], h["exact"]) for h in one["heads"]]
        torch.testing.assert_close(torch.tensor([h["score"] for h in dp["heads"]]),
                                   torch.tensor([h["score"] for h in one["heads"]]), rtol=0, atol=1e-6)
        assert dp["forward_equivalents"] == pytest.approx(one["forward_equivalents"], abs=2e-3)
    assert ranks[0]["result"]["heads"] == ranks[1]["result"]["heads"]  # every rank: the same whole result


def test_run_two_processes_equals_one(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m pear run`: discovery with its re-checks split between the
    ranks, the data-parallel fit, then rank 0 folds and saves; the same heads, Δπ and
    coefficients as one process."""
    from pear.cli import main
    from tiny_models import tiny_model

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    args = ["run", "--model", str(folder), "--k", "2", "--steps", "3", "--batch", "6", "--length", "12",
            "--eval-batch", "4", "--lr", "0.1", "--device", "cpu", "--dtype", "fp32", "--no-progress",
            "--discovery-settings", "8x10"]
    two = torchrun(args + ["--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report: ") == 1 and (tmp_path / "two" / "model" / "pear.json").is_file()
    assert one_thread(main, args + ["--out", str(tmp_path / "one")]) == 0
    one, dp = (json.loads((tmp_path / d / "coefficients.json").read_text())["heads"] for d in ("one", "two"))
    assert [(h["layer"], h["head"]) for h in one] == [(h["layer"], h["head"]) for h in dp]
    torch.testing.assert_close(torch.tensor([h["coefficient"] for h in dp]),
                               torch.tensor([h["coefficient"] for h in one]), rtol=0, atol=1e-5)
    one, dp = (json.loads((tmp_path / d / "heads.json").read_text())["heads"] for d in ("one", "two"))
    assert [(h["layer"], h["head"], h["exact"]) for h in one] == [(h["layer"], h["head"], h["exact"]) for h in dp]
    torch.testing.assert_close(torch.tensor([h["score"] for h in dp]), torch.tensor([h["score"] for h in one]),
                               rtol=0, atol=1e-6)


@pytest.mark.data
def test_eval_processes_benchmark(tiny_folder, data_dir, tmp_path):
    """benchmarks/eval_processes.py: the same `pear eval` with one process and with two under
    torchrun; it records examples/s for each and finds no output that differs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import eval_processes

    out = tmp_path / "ep.json"
    assert eval_processes.main(["--model", str(tiny_folder), "--task", "closedbook", "--limit", "6", "--processes",
                                "1,2,2:3", "--device", "cpu", "--dtype", "fp32", "--data-dir", str(data_dir),
                                "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["processes"], r["batch_size"]) for r in runs] == [(1, "auto"), (2, "auto"), (2, 3)]
    assert all(r["examples"] == 6 for r in runs) and "--batch-size 3" in runs[2]["command"]
    assert all(r["outputs_differing"] == 0 and r["examples_per_s"] > 0 for r in runs)
    assert runs[0]["command"].startswith("pear eval") and runs[1]["command"].startswith(
        "torchrun --standalone --nproc-per-node 2 -m pear eval")


LEAVE_AT_EXIT = """
import atexit, os, sys
import torch.distributed as dist
from pear import distributed

# registered before init, so it runs after init's own handler (exit handlers run last in, first out)
atexit.register(lambda: open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + "-"
                                          + ("still-in" if dist.is_initialized() else "left")), "w").close())
assert distributed.init()
distributed.barrier()
"""


def test_processes_leave_the_group_before_interpreter_exit(tmp_path):
    """A gloo group still alive at interpreter teardown can abort a finished process (SIGABRT,
    "terminate called without an active exception"); `init` therefore leaves it at exit."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_AT_EXIT)
    run = torchrun([str(tmp_path)], tmp_path, target=(str(script),))
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-left", "rank1-left"]


CONVERT_ON_EACH_RANK = """
import json, sys
from pathlib import Path
from pear import distributed, loading
assert distributed.init()
folder = loading._converted_gguf(loading.resolve_spec(sys.argv[1]))
out = Path(sys.argv[2]) / f"rank{distributed.rank()}.json"
out.write_text(json.dumps(sorted(p.name for p in folder.iterdir())))
distributed.end(0)
"""


def test_gguf_converted_once_under_torchrun(tmp_path):
    """Ranks loading the same GGUF together: transformers' save_pretrained writes weights on rank
    0 alone, so a copy converted on another rank holds only the tokenizer and, renamed first,
    would become the cached folder. Rank 0 converts, the others wait and read its folder."""
    script = tmp_path / "convert.py"
    script.write_text(CONVERT_ON_EACH_RANK)
    run = torchrun(["smollm2-135m", str(tmp_path)], tmp_path, target=(str(script),))
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] and {"config.json", "model.safetensors", "tokenizer.json"} <= set(seen[0])
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1  # no temporary copy left


@pytest.mark.parametrize("procs, gpus, share", [(4, 1, 0.95 / 4), (8, 2, 0.95 / 4), (3, 2, 0.95 / 2), (2, 2, None)])
def test_processes_sharing_a_gpu_split_its_memory(monkeypatch, procs, gpus, share):
    """Several processes on one GPU each get an even share of its memory, so a process whose
    allocator grew on long prompts cannot starve the others (it halves its own batches);
    one process per GPU keeps the whole GPU."""
    from pear import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", str(procs))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))
    monkeypatch.setenv("LOCAL_RANK", str(procs - 1))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d: calls.setdefault("fraction", (f, d)))
    assert distributed.init()
    assert calls["device"] == (procs - 1) % gpus
    assert calls["backend"] == ("gloo" if procs > gpus else "nccl")
    if share is None:
        assert "fraction" not in calls
    else:
        assert calls["fraction"] == (pytest.approx(share), (procs - 1) % gpus)
