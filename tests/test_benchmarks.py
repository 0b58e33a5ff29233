"""The GPU benchmark script itself runs on CPU for a tiny shape (so CI exercises it)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import perf_scale  # noqa: E402
import shapes  # noqa: E402


def test_perf_scale_tiny_cpu_reports_every_part(tmp_path):
    out = tmp_path / "perf.json"
    rc = perf_scale.main(["--shape", "tiny", "--device", "cpu", "--quiet", "--k", "4", "--fit-steps", "2",
                          "--context", "64", "--new-tokens", "4", "--trials", "2", "--profile", "--py-profile", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    parts = res["parts"]
    assert set(parts) == {"discover-fast", "discover-exact", "fit", "overhead"}
    assert parts["discover-fast"]["heads"] == 8 and len(parts["discover-exact"]["top_k"]) == 4
    assert parts["discover-fast"]["forward_equivalents"] > 0
    assert parts["fit"]["steps"] == 2 and parts["fit"]["seconds_per_step"] > 0
    ov = parts["overhead"]
    assert ov["base"]["prefill"] > 0 and ov["pear"]["decode"] > 0
    assert set(ov["ratio_pear_to_base"]) == {"prefill", "decode"}
    assert res["command"].startswith("python3 ") and "--shape tiny" in res["command"]
    # --profile: each part's top operators in the JSON and the full tables beside it
    assert set(res["profile"]) == set(parts)
    assert all(r and r[0]["self_ms"] > 0 and 0 < r[0]["share"] <= 1 for r in res["profile"].values())
    assert "aten::mm" in {op["op"] for op in res["profile"]["fit"]}
    assert "== discover-fast" in out.with_suffix(".profile.txt").read_text()
    # --py-profile: cProfile tables per part, naming pear's own functions
    py = out.with_suffix(".pyprofile.txt").read_text()
    assert all(f"== {p}" in py for p in parts) and "pear/discover/" in py and "fit.py" in py


def test_real_shapes_declare_the_published_sizes():
    cfg = shapes.config_for("llama2-7b")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size,
            cfg.vocab_size) == (32, 32, 4096, 11008, 32000)
    cfg = shapes.config_for("qwen2.5-32b")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (64, 40, 8, 5120)
    model = shapes.build("tiny", device="cpu", dtype=torch.float32)
    assert model(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)


def test_backend_check_runs_both_modes_on_cpu():
    import backend_check

    for mode in ("default", "nocudnn"):
        times = backend_check.main([mode, "--shape", "tiny", "--device", "cpu"])
        assert [m for m, _ in times] == ["fast", "fast", "exact"] and all(t > 0 for _, t in times)


@pytest.mark.data
def _tiny_llama_folder(tok, tmp_path):
    """A 2-layer random llama with `tok` (SmolLM2's tokenizer) and a 4,096-token window, saved as a
    model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_decode_throughput_runs_on_cpu_and_reports_a_failed_compile(smollm2_bf16, data_dir, tmp_path):
    """benchmarks/decode_throughput.py on a tiny llama (SmolLM2's tokenizer, a window that
    holds mdqa-10): the seven paths give the same answers and their rates (packed: also the time of
    the prompts alone, packed); a compile that cannot work is reported in the JSON, exit 1, with
    the eager numbers kept."""
    import decode_throughput

    folder = _tiny_llama_folder(smollm2_bf16.tokenizer, tmp_path)
    args = ["--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--limit", "1", "--positions", "1,10",
            "--max-new-tokens", "6", "--data-dir", str(data_dir)]
    ok = args + ["--decoders", "static,continuous,packed,continuous+packed,compiled,continuous-static+packed,"
                                 "continuous-static+packed-shared",
                 "--out", str(tmp_path / "ok.json")]
    assert decode_throughput.main(ok) == 0
    res = json.loads((tmp_path / "ok.json").read_text())
    assert res["examples"] == 2 and res["skipped"] == 0 and res["eager"]["new_tokens"] > 2
    assert res["static"]["outputs_differ_from_eager"] == 0 and res["static"]["runs_agree"]
    assert res["static"]["compiled"] is False  # on CPU by default: the static cache alone
    assert res["eager"]["examples_per_s"] > 0 and res["static"]["examples_per_s"] > 0 and res["speedup"] > 0
    assert res["continuous"]["outputs_differ_from_eager"] == 0 and res["continuous"]["speedup"] > 0
    assert res["packed"]["outputs_differ_from_eager"] == 0 and res["packed"]["runs_agree"]
    assert res["packed"]["prompts_only"]["seconds"] > 0 and res["packed"]["prompts_only"]["examples_per_s"] > 0
    assert res["continuous+packed"]["outputs_differ_from_eager"] == 0 and res["continuous+packed"]["runs_agree"]
    assert res["compiled"]["outputs_differ_from_eager"] == 0 and res["compiled"]["runs_agree"]
    assert res["compiled"]["prompts_only"]["seconds"] > 0
    assert res["continuous-static+packed"]["outputs_differ_from_eager"] == 0
    assert res["continuous-static+packed"]["compiled"] is False and "speedup" in res["continuous-static+packed"]
    assert res["continuous-static+packed-shared"]["outputs_differ_from_eager"] == 0
    assert res["continuous-static+packed-shared"]["shares_prefixes"] and "shares_prefixes" not in res["packed"]
    assert res["command"].startswith("python3 benchmarks/decode_throughput.py ") and "--limit 1" in res["command"]
    assert res["versions"]["torch"] == torch.__version__ and "cpu_count" in res["hardware"]

    moice = args + ["--variant", "moice", "--variant-option", "routers=init", "--decoders", "continuous",
                    "--out", str(tmp_path / "moice.json")]
    assert decode_throughput.main(moice) == 0  # a variant: eager and continuous agree
    res = json.loads((tmp_path / "moice.json").read_text())
    assert res["variant"] == "moice" and res["continuous"]["outputs_differ_from_eager"] == 0 and "static" not in res

    bad = args + ["--compile", "on", "--compile-backend", "no-such-backend", "--out", str(tmp_path / "bad.json")]
    assert decode_throughput.main(bad) == 1
    res = json.loads((tmp_path / "bad.json").read_text())
    assert "torch.compile" in res["static"]["error"] and res["eager"]["examples_per_s"] > 0


def _screen_file(work, model, label, per_position):
    """A variant's screen file as `pear eval` writes it (only the fields the choice reads)."""
    accs = {str(p): {"accuracy": a} for p, a in per_position.items()}
    accs["all"] = {"accuracy": sum(per_position.values()) / len(per_position)}
    f = work / "single" / model / f"mdqa-20-h1-{label}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"tasks": {"mdqa-20": {"models": {label: accs}}}}))


@pytest.mark.parametrize("rule,chosen", [("goal", "flat"), ("mean", "ends")])
def test_recipe_study_selection_rules(tmp_path, monkeypatch, rule, chosen):
    """The goal rule counts models meeting Δ ≥ +3 points with the gap cut to 2/3; the round-1 rule
    takes the largest mean Δ. `ends` gains more on average by lifting the best position (its gap
    widens); `flat` lifts the middle on both models and wins under the goal rule."""
    import recipe_study

    for m in ("a", "b"):
        _screen_file(tmp_path, m, "base", {1: 0.4, 10: 0.1, 20: 0.4})           # gap 0.30
        _screen_file(tmp_path, m, "flat", {1: 0.4, 10: 0.25, 20: 0.4})         # +5 points, gap 0.15
        _screen_file(tmp_path, m, "ends", {1: 0.7, 10: 0.1, 20: 0.4})          # +10 points, gap 0.60
    monkeypatch.setattr(sys, "argv", ["recipe_study.py", "--work", str(tmp_path), "--stage", "select",
                                      "--screen-models", "a,b", "--recipes", "flat,ends", "--rule", rule])
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"] == chosen
    assert sel["score"]["flat"]["meets_goal"] == 2 and sel["score"]["ends"]["meets_goal"] == 0
    assert sel["score"]["ends"]["mean_delta"] == pytest.approx(0.1)


def test_recipe_study_per_model_rule(tmp_path, monkeypatch, capsys):
    """Per model: the largest Δ if it reaches +3 points, else paper; the unscreened 1.5B takes
    its sibling's choice; a model whose screen lacks a candidate stops the choice, unless the
    candidate's fold was refused (no model to screen: it cannot be chosen, and selection.json says why)."""
    import recipe_study

    for m in ("gemma3-270m", "qwen2.5-coder-0.5b"):
        _screen_file(tmp_path, m, "base", {1: 0.4, 10: 0.1, 20: 0.4})
        _screen_file(tmp_path, m, "paper", {1: 0.4, 10: 0.11, 20: 0.4})
    _screen_file(tmp_path, "gemma3-270m", "chan", {1: 0.6, 10: 0.3, 20: 0.6})      # +20 points
    _screen_file(tmp_path, "qwen2.5-coder-0.5b", "chan", {1: 0.41, 10: 0.13, 20: 0.4})  # +1.3: below +3
    argv = ["recipe_study.py", "--work", str(tmp_path), "--stage", "select", "--rule", "per-model",
            "--recipes", "paper,chan", "--screen-models", "gemma3-270m,qwen2.5-coder-0.5b",
            "--models", "gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"]
    monkeypatch.setattr(sys, "argv", argv)
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"] == {"gemma3-270m": "chan", "qwen2.5-coder-0.5b": "paper", "qwen2.5-coder-1.5b": "paper"}
    assert sel["delta"]["gemma3-270m"]["chan"] == pytest.approx(0.2)
    (tmp_path / "single" / "gemma3-270m" / "mdqa-20-h1-chan.json").unlink()
    with pytest.raises(RuntimeError, match="gemma3-270m: screen incomplete, missing chan"):
        recipe_study.main()
    log = tmp_path / "logs" / "gemma3-270m-fit-chan-0.log"  # its fit ran, but its fold was refused: no model
    log.parent.mkdir()
    log.write_text("$ pear run ...\npear: error: fold verification failed: folded logits differ from hooked "
                   "logits by 3.37 > tolerance 0.303; nothing saved\n# rc 2, 117 s\n")
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"]["gemma3-270m"] == "paper" and "chan" not in sel["delta"]["gemma3-270m"]
    assert sel["refused"] == {"gemma3-270m": {"chan": "fold verification failed: folded logits differ from hooked "
                                                      "logits by 3.37 > tolerance 0.303; nothing saved"}}


def test_recipe_study_per_model_gap_rule(tmp_path, monkeypatch):
    """per-model-gap: among the candidates at >= +3 points, the smallest half-1 gap wins, not
    the largest gain; with none at +3, paper."""
    import recipe_study

    for m in ("gemma3-270m", "smollm2-135m"):
        _screen_file(tmp_path, m, "base", {1: 0.4, 10: 0.1, 20: 0.4})          # gap 0.30
    _screen_file(tmp_path, "gemma3-270m", "all", {1: 0.6, 10: 0.3, 20: 0.6})   # +20 points, gap 0.30
    _screen_file(tmp_path, "gemma3-270m", "inner", {1: 0.45, 10: 0.3, 20: 0.45})  # +10 points, gap 0.15
    _screen_file(tmp_path, "smollm2-135m", "all", {1: 0.4, 10: 0.11, 20: 0.4})   # +0.3: below +3
    _screen_file(tmp_path, "smollm2-135m", "inner", {1: 0.3, 10: 0.2, 20: 0.3})  # -3.3, gap 0.10
    argv = ["recipe_study.py", "--work", str(tmp_path), "--stage", "select", "--rule", "per-model-gap",
            "--recipes", "all,inner", "--screen-models", "gemma3-270m,smollm2-135m", "--models", "gemma3-270m,smollm2-135m"]
    monkeypatch.setattr(sys, "argv", argv)
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"] == {"gemma3-270m": "inner", "smollm2-135m": "paper"}
    assert sel["rule"].startswith("per model: among the candidates that per-model allows")
    monkeypatch.setattr(sys, "argv", [a if a != "per-model-gap" else "per-model" for a in argv])
    assert recipe_study.main() == 0
    assert json.loads((tmp_path / "selection.json").read_text())["chosen"]["gemma3-270m"] == "all"


def test_recipe_study_paired_from_parts(tmp_path):
    """The screen's paired statistics come from the per-example parts alone (no model): each
    variant against its model's base on the same examples; parts of another size (the report
    half's) are left out."""
    import gzip

    import recipe_study

    def part(name, spec, label, scores, of=None):
        recs = [{"id": f"q{i // 5}", "condition": c, "score": s, "skipped": False}
                for i, (c, s) in enumerate(zip(["1", "6", "10", "15", "20"] * 2, scores))]
        (tmp_path / "parts").mkdir(exist_ok=True)
        with gzip.open(tmp_path / "parts" / f"{label}__mdqa-20__{name}.json.gz", "wt") as f:
            json.dump({"label": label, "spec": spec, "start": 0, "of": of or len(recs), "records": recs}, f)

    part("a", "/m/gemma3-270m.gguf", "base", [1, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    part("b", "/w/runs/gemma3-270m/chan/model", "chan", [1, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    part("c", "/w/runs/gemma3-270m/late/model", "late", [1] * 10, of=30)  # another half's size: ignored
    out = recipe_study.screen_paired(tmp_path, ["gemma3-270m"], screen_q=2)
    assert list(out) == ["gemma3-270m/chan"]
    v = out["gemma3-270m/chan"]
    assert v["acc"] == 0.8 and v["diff"] == pytest.approx(0.5) and v["n"] == 10
    assert v["per_position"] == {"1": 1.0, "6": 1.0, "10": 1.0, "15": 0.0, "20": 1.0}
    assert v["gap"] == 1.0 and v["base_gap"] == 1.0 and v["ci95"][0] > 0
    assert json.loads((tmp_path / "screen_paired.json").read_text()) == out


def test_recipe_study_report_paired_joins_parts(tmp_path):
    """The report half's statistics: the variants evaluated on half 2 (their `single/` files say
    which and how many examples), each joined from its parts (a long evaluation is saved in
    several), against the base; a task without positions has no gap."""
    import gzip

    import recipe_study

    def single(task, label, n):
        d = tmp_path / "single" / "smollm2-135m"
        d.mkdir(parents=True, exist_ok=True)
        v = {"all": {"n": n, "skipped": 0}}
        (d / f"{task}-h2-{label}.json").write_text(json.dumps({"tasks": {task: {"models": {label: v}}}}))

    def part(name, task, spec, label, conds, scores, start, of):
        recs = [{"id": f"q{(start + i) // len(set(conds))}", "condition": c, "score": s}
                for i, (c, s) in enumerate(zip(conds, scores))]
        (tmp_path / "parts").mkdir(exist_ok=True)
        with gzip.open(tmp_path / "parts" / f"{label}__{task}__{name}.json.gz", "wt") as f:
            json.dump({"label": label, "spec": spec, "start": start, "of": of, "records": recs}, f)

    base, odc = "/m/smollm2-135m.gguf", "/w/runs/smollm2-135m/odc/model"
    for label in ("base", "odc"):
        single("mdqa-20", label, 4)
        single("closedbook", label, 3)
    part("a", "mdqa-20", base, "base", ["1", "20"], [0, 1], 0, 4)
    part("b", "mdqa-20", base, "base", ["1", "20"], [0, 1], 2, 4)
    part("c", "mdqa-20", odc, "odc", ["1", "20"], [1, 1], 0, 4)
    part("d", "mdqa-20", "/v/runs/smollm2-135m/odc/model", "odc", ["1", "20"], [1, 0], 2, 4)  # resumed elsewhere
    part("e", "mdqa-20", odc, "screen", ["1", "20"] * 5, [1] * 10, 0, 10)  # half 1's size: not read
    part("f", "closedbook", base, "base", ["all"] * 3, [1, 0, 0], 0, 3)
    part("g", "closedbook", odc, "odc", ["all"] * 3, [0, 0, 0], 0, 3)
    out = recipe_study.report_paired(tmp_path, ["smollm2-135m"], [("mdqa-20", 300), ("closedbook", None)])
    v = out["smollm2-135m"]["mdqa-20"]["odc"]
    assert v["n"] == 4 and v["acc"] == 0.75 and v["diff"] == pytest.approx(0.25)
    assert v["per_position"] == {"1": 1.0, "20": 0.5} and v["base_per_position"] == {"1": 0.0, "20": 1.0}
    assert v["gap"] == 0.5 and v["base_gap"] == 1.0
    c = out["smollm2-135m"]["closedbook"]["odc"]
    assert c["acc"] == 0.0 and c["base_acc"] == pytest.approx(1 / 3) and "gap" not in c and c["n"] == 3
    assert json.loads((tmp_path / "report_paired.json").read_text()) == out
    part("d2", "mdqa-20", odc, "odc", ["1", "20"], [0, 0], 2, 4)  # another evaluation at the same start
    with pytest.raises(RuntimeError, match="two different parts"):
        recipe_study.report_paired(tmp_path, ["smollm2-135m"], [("mdqa-20", 300)])
    (tmp_path / "parts" / "odc__mdqa-20__d2.json.gz").unlink()
    (tmp_path / "parts" / "odc__mdqa-20__d.json.gz").unlink()  # a part missing: the variant is left out
    assert "mdqa-20" not in recipe_study.report_paired(tmp_path, ["smollm2-135m"], [("mdqa-20", 300)]).get(
        "smollm2-135m", {})
    # half 1 evaluated at half 2's size (MMLU: 7,021 items each): its parts are told apart by their examples
    with gzip.open(tmp_path / "parts" / "base__closedbook__h1.json.gz", "wt") as f:
        json.dump({"label": "base", "spec": base, "start": 0, "of": 3,
                   "records": [{"id": f"other{i}", "condition": "all", "score": 1} for i in range(3)]}, f)
    with pytest.raises(RuntimeError, match="two different parts"):
        recipe_study._records(tmp_path, "closedbook", ["smollm2-135m"], lambda of: of == 3)
    half2 = {(f"q{i}", "all") for i in range(3)}
    recs = recipe_study._records(tmp_path, "closedbook", ["smollm2-135m"], lambda of: of == 3, examples=half2)
    assert [r["score"] for r in recs["smollm2-135m"]["base"]] == [1, 0, 0]


def test_recipe_study_candidates_with_options_and_a_guard(tmp_path, monkeypatch, capsys):
    """A candidate may change a recipe's fit options (fitted with those `pear run` options); with
    --guard the per-model rule drops a candidate that loses more than half a point on the guard
    task, however much it gains on mdqa-20."""
    import recipe_study

    assert recipe_study.candidate("paper") == ("paper", [])
    assert recipe_study.candidate("paper@lr=0.02,steps=80") == ("paper", ["--lr", "0.02", "--steps", "80"])
    assert recipe_study.split_candidates("paper,retrieval-channels@lr=0.02,anchor=10,paper@lr=0.01,retrieval") == [
        "paper", "retrieval-channels@lr=0.02,anchor=10", "paper@lr=0.01", "retrieval"]
    assert recipe_study.candidate("retrieval-channels@anchor=10") == ("retrieval-channels", ["--anchor", "10"])
    assert recipe_study.candidate("retrieval-channels@anchor=100,anchor_source=questions") == (
        "retrieval-channels", ["--anchor", "100", "--anchor-source", "questions"])
    assert recipe_study.candidate("last-self-distill-channels@hold=0.5,steps=10") == (
        "last-self-distill-channels@hold=0.5", ["--steps", "10"])  # `--recipe` reads the objective's option
    for bad in ("nosuch@lr=1", "paper@lr", "paper@dtype=fp32"):
        with pytest.raises(ValueError):
            recipe_study.candidate(bad)

    def mmlu_file(model, label, acc):
        f = tmp_path / "single" / model / f"mmlu-h1-{label}.json"
        f.write_text(json.dumps({"tasks": {"mmlu": {"models": {label: {"all": {"accuracy": acc}}}}}}))

    m = "gemma3-270m"
    cands = ["paper", "retrieval-channels", "paper@lr=0.02"]
    _screen_file(tmp_path, m, "base", {1: 0.4, 10: 0.1, 20: 0.4})
    _screen_file(tmp_path, m, "paper", {1: 0.4, 10: 0.11, 20: 0.4})
    _screen_file(tmp_path, m, "retrieval-channels", {1: 0.6, 10: 0.3, 20: 0.6})   # +20 points ...
    _screen_file(tmp_path, m, "paper@lr=0.02", {1: 0.45, 10: 0.2, 20: 0.45})      # +6.7 points
    for label, acc in [("base", 0.30), ("retrieval-channels", 0.28), ("paper@lr=0.02", 0.297)]:
        mmlu_file(m, label, acc)                   # ... at -2 MMLU points; paper (+0.3) cannot be chosen: no guard
    argv = ["recipe_study.py", "--work", str(tmp_path), "--stage", "select", "--rule", "per-model",
            "--recipes", ",".join(cands), "--screen-models", m, "--models", m]
    monkeypatch.setattr(sys, "argv", argv)
    assert recipe_study.main() == 0
    assert json.loads((tmp_path / "selection.json").read_text())["chosen"] == {m: "retrieval-channels"}
    monkeypatch.setattr(sys, "argv", argv + ["--guard", "mmlu=2000"])
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"] == {m: "paper@lr=0.02"} and sel["guard"]["delta"][m]["retrieval-channels"] == pytest.approx(-0.02)
    assert set(sel["guard"]["delta"][m]) == {"retrieval-channels", "paper@lr=0.02"}

    import answer_length  # --length-words: a gain that does not hold with answers cut to N words is out
    cut = {"retrieval-channels": -0.01, "paper@lr=0.02": 0.05}
    monkeypatch.setattr(answer_length, "length_check", lambda work, models, data_dir, half, questions: {m: {
        r: {"by_words": {"20": {"diff": d}}} for r, d in cut.items()}})
    monkeypatch.setattr(sys, "argv", argv + ["--length-words", "20"])
    assert recipe_study.main() == 0
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sel["chosen"] == {m: "paper@lr=0.02"} and sel["length"]["delta"][m] == cut
    cut["paper@lr=0.02"] = 0.02  # below +3 once cut: nothing is left, so paper
    assert recipe_study.main() == 0
    assert json.loads((tmp_path / "selection.json").read_text())["chosen"] == {m: "paper"}

    calls = []  # the fit of such a candidate: its recipe and options, in its own folder
    monkeypatch.setattr(recipe_study, "pear", lambda args, log: calls.append(args))
    monkeypatch.setattr(sys, "argv", argv)
    st = recipe_study.Study(recipe_study.argparse.Namespace(
        work=str(tmp_path), device="cpu", batch_size=8, max_batch_tokens=1000, model_file=None, run_args=[]))
    st.fit(m, "paper@lr=0.02", seed=1)
    assert calls[0][calls[0].index("--recipe") + 1:][:3] == ["paper", "--lr", "0.02"]
    assert calls[0][calls[0].index("--out") + 1].endswith("runs/gemma3-270m/paper@lr=0.02-seed1")
    monkeypatch.setattr(sys, "argv", argv[:-4] + ["--recipes", "paper@lr"])
    assert recipe_study.main() == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_benchmark_scripts_parse_and_use_existing_options():
    """Every GPU shell script parses, and none asks `pear` for an option it no longer has
    (multi-GPU evaluation is `torchrun -m pear eval`, not claim files)."""
    import subprocess

    scripts = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.sh"))
    assert scripts
    for f in scripts:
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f
        assert "--parts claim" not in f.read_text(), f


@pytest.mark.data
def test_answer_length_check_separates_reading_from_verbosity(tmp_path, data_dir):
    """A variant that only writes longer answers (the gold answer after 12 words) wins on the
    metric's first line and loses nothing it did not have at 10 words; the rescoring reproduces
    the recorded scores, and a record whose score disagrees stops it."""
    import gzip

    import answer_length
    from pear.evaluate.registry import BuildContext, build_task

    task = build_task("mdqa-20", BuildContext(data_dir, limit=2, half=2))
    (tmp_path / "parts").mkdir()

    def part(label, outputs, scores, examples=task.examples, name=""):
        recs = [{"id": e.id, "condition": e.condition, "output": o, "score": s}
                for e, o, s in zip(examples, outputs, scores)]
        with gzip.open(tmp_path / "parts" / f"{label}__mdqa-20__{label}{name}.json.gz", "wt") as f:
            spec = "/m/smollm2-135m.gguf" if label == "base" else f"/w/runs/smollm2-135m/{label}/model"
            json.dump({"label": label, "spec": spec, "start": 0, "of": len(recs),
                       "records": recs}, f)

    n = len(task.examples)
    gold = [e.answers[0] for e in task.examples]
    part("base", ["I do not know."] * n, [0.0] * n)
    filler = "well the passages say many things about this question and the answer is "  # 14 words
    part("verbose", [filler + g for g in gold], [1.0] * n)
    half1 = build_task("mdqa-20", BuildContext(data_dir, limit=2, half=1)).examples
    part("base", ["x"] * n, [0.0] * n, half1, name="-h1")  # the other half at the same size: not read
    out = answer_length.length_check(tmp_path, ["smollm2-135m"], data_dir, half=2, questions=2)
    v = out["smollm2-135m"]["verbose"]["by_words"]
    assert v["line"]["diff"] == 1.0 and v["20"]["diff"] == 1.0 and v["10"]["diff"] == 0.0
    assert json.loads((tmp_path / "length_check_h2.json").read_text()) == out
    part("verbose", [filler + g for g in gold], [0.0] * n)  # a recorded score the metric does not give
    with pytest.raises(RuntimeError, match="reproduce"):
        answer_length.length_check(tmp_path, ["smollm2-135m"], data_dir, half=2, questions=2)


def test_gpu_time_by_kind_counts_each_kernel_once():
    """The profiler lists an operator (aten::mm) with its kernel's device time as well as the kernel
    itself: only the kernels are summed, so the kinds add up to the GPU's time."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    import profile_decode

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [E(key="aten::mm", device_type=cpu, self_device_time_total=100.0),
              E(key="nvjet_tst_128x256", device_type=gpu, self_device_time_total=100.0),
              E(key="aten::_flash_attention_forward", device_type=cpu, self_device_time_total=50.0),
              E(key="flash_fwd_kernel", device_type=gpu, self_device_time_total=50.0),
              E(key="vectorized_elementwise_kernel", device_type=gpu, self_device_time_total=30.0),
              E(key="aten::copy_", device_type=cpu, self_device_time_total=20.0),
              E(key="Memcpy DtoD (Device -> Device)", device_type=gpu, self_device_time_total=20.0)]
    kinds = profile_decode.gpu_time_by_kind(E(key_averages=lambda: events))
    assert kinds == {"attention": 50.0, "matrix products": 100.0, "copies": 20.0,
                     "the rest (elementwise, normalisation, reductions)": 30.0}
    top = profile_decode.gpu_kernels(E(key_averages=lambda: events))
    assert [(n, k) for n, _, k in top] == [("nvjet_tst_128x256", "matrix products"), ("flash_fwd_kernel", "attention"),
                                           ("vectorized_elementwise_kernel", profile_decode.REST),
                                           ("Memcpy DtoD (Device -> Device)", "copies")]


def test_position_profile_scores_the_answer_tokens_and_pairs_each_recipe_with_base():
    """answer_logprob is the mean log-probability of the answer tokens alone (checked against a plain
    forward pass, sequences of different lengths batched); the profile's means, gap and paired
    differences are those of the scores; coefficients applied with hooks change the scores."""
    import position_profile as pp
    from pear.folding import HeadScaling
    from tiny_models import tiny_model

    m = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 100, (n,), generator=g).tolist(), a) for n, a in [(12, 3), (9, 1), (15, 4)]]
    got = pp.answer_logprob(m, seqs, micro_batch=2)
    with torch.no_grad():
        for (ids, a), v in zip(seqs, got):
            lp = m(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
            want = sum(lp[t - 1, ids[t]].item() for t in range(len(ids) - a, len(ids))) / a
            assert v == pytest.approx(want, abs=1e-4)
    with HeadScaling(m, {(0, 1): 0.2, (1, 2): 3.0}, trainable=False):
        assert max(abs(x - y) for x, y in zip(pp.answer_logprob(m, seqs, 2), got)) > 1e-3

    scores = {"base": [-1.0, -2.0, -1.5, -3.0], "r": [-0.5, -2.0, -1.0, -2.0]}
    prof = pp.profile(scores, ["1", "2", "1", "2"])
    assert prof["base"]["by_position"] == {"1": -1.25, "2": -2.5} and prof["base"]["gap"] == 1.25
    assert prof["r"]["by_position"] == {"1": -0.75, "2": -2.0} and prof["r"]["gap"] == 1.25
    assert prof["r"]["vs_base"]["1"]["diff"] == pytest.approx(0.5) and prof["r"]["vs_base"]["2"]["diff"] == pytest.approx(0.5)
    assert prof["r"]["vs_base"]["all"]["diff"] == pytest.approx(0.5) and "vs_base" not in prof["base"]
    assert "| r |" in pp.table(prof)


def test_position_profile_targets_are_the_base_models_right_first_lines(tmp_path):
    """--targets keeps the examples the base part scored right, each with its own first line as the
    target, matched on id and gold position; a part that lacks an example is refused."""
    import gzip
    import json
    from types import SimpleNamespace as NS

    import position_profile as pp
    from pear.errors import PearError

    exs = [NS(id="q0", condition="1"), NS(id="q0", condition="20"), NS(id="q1", condition="1")]
    recs = [{"id": "q0", "condition": "20", "score": 1.0, "output": "It is Paris.\nMore text"},
            {"id": "q0", "condition": "1", "score": 0.0, "output": "Lyon"},
            {"id": "q1", "condition": "1", "score": 1.0, "output": "In 1901, the first prize."}]
    part = tmp_path / "base__mdqa-20__k.json.gz"
    with gzip.open(part, "wt") as f:
        json.dump({"label": "base", "records": recs}, f)
    got = pp.own_answers(exs, str(part))
    assert [(ex.id, ex.condition, a) for ex, a in got] == [("q0", "20", "It is Paris."),
                                                          ("q1", "1", "In 1901, the first prize.")]
    with pytest.raises(PearError, match="lacks 1 of the examples"):
        pp.own_answers(exs + [NS(id="q2", condition="1")], str(part))
    with pytest.raises(PearError, match="cannot read"):
        pp.own_answers(exs, str(tmp_path / "missing.json.gz"))


def test_position_profile_scores_variants_from_the_command_line(tmp_path, monkeypatch):
    """--variant LABEL=NAME with its --variant-option scores the model under that variant (here a
    weight edit, undone afterwards), beside the base; coefficients act at their file's site (a
    query-side file on the queries); a taken label or an unknown option is refused."""
    import json
    from types import SimpleNamespace as NS

    import position_profile as pp
    from pear.errors import PearError
    from pear.loading import LoadedModel, ModelSpec
    from tiny_models import tiny_model

    m = tiny_model("llama")
    before = {n: p.clone() for n, p in m.state_dict().items()}
    exs = [NS(id=f"q{i}", condition=c, prompt="p", answers=["a"]) for i in range(2) for c in ("1", "20")]
    monkeypatch.setattr("pear.evaluate.registry.build_task", lambda *a, **k: NS(positional=True, examples=exs))
    monkeypatch.setattr("pear.loading.load_model", lambda *a, **k: LoadedModel(m, None, ModelSpec("t", "folder", "t")))
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(pp, "answer_sequence", lambda tok, p, a: (torch.randint(3, 100, (10,), generator=g).tolist(), 2))
    out, coefs = tmp_path / "p.json", tmp_path / "coefficients.json"
    coefs.write_text(json.dumps({"granularity": "head", "heads": [{"layer": 0, "head": 1, "coefficient": 0.2}]}))
    args = ["--data-dir", str(tmp_path), "--device", "cpu", "--out", str(out), "--variant", "slow=rope-bands",
            "--variant-option", "bands=slow", "--variant-option", "factor=3", "--coefficients", f"c={coefs}"]
    assert pp.main(args) == 0
    res = json.loads(out.read_text())
    assert set(res["profile"]) == {"base", "c", "slow"}
    assert res["per_example"]["slow"] != res["per_example"]["base"] != res["per_example"]["c"]
    assert all(torch.equal(p, before[n]) for n, p in m.state_dict().items())
    q = tmp_path / "query.json"  # the same scale on the head's queries: scored where the file says it acts
    q.write_text(json.dumps({"granularity": "head", "site": "query",
                             "heads": [{"layer": 0, "head": 1, "coefficient": 0.2}]}))
    assert pp.main(args + ["--coefficients", f"q={q}"]) == 0
    res = json.loads(out.read_text())
    assert res["per_example"]["q"] not in (res["per_example"]["c"], res["per_example"]["base"])
    with pytest.raises(PearError, match="label 'slow' is taken"):
        pp.main(args + ["--variant", "slow=rope-bands"])
    with pytest.raises(PearError, match="has no option colour"):
        pp.main(args[:-6] + ["--variant", "x=rope-bands", "--variant-option", "colour=red"])


def test_position_profile_labels_may_hold_equals_signs(tmp_path):
    """A study's label holds '=' ("retrieval-channels@anchor=10"), and so does its folder."""
    import position_profile as pp
    from pear.errors import PearError

    f = tmp_path / "r@anchor=10" / "coefficients.json"
    f.parent.mkdir()
    f.write_text("{}")
    assert pp.split_label(f"r@anchor=10={f}") == ("r@anchor=10", str(f))
    with pytest.raises(PearError, match="LABEL=FILE"):
        pp.split_label(f"r@anchor=10={tmp_path / 'missing.json'}")


def test_fold_screen_rebuilds_round_14_from_its_parts(tmp_path, data_dir):
    """benchmarks/fold_screen.py rebuilds round 14's screen_paired.json, selection.json and
    report_paired.json from the committed parts alone; the rule (Δ and Δ at 20 words ≥ +3 points,
    MMLU guard ≥ −0.5) chooses the one candidate that passes, and paper when none does."""
    import shutil

    import fold_screen

    src = Path(__file__).resolve().parent.parent / "benchmarks/results/recipe_study_round14/smollm2-135m"
    work = tmp_path / "w"
    work.mkdir()
    for name in ("parts", "names.json", "length_check_h1.json"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, work / name)
    assert fold_screen.main(["--work", str(work), "--model", "smollm2-135m", "--names", str(work / "names.json"),
                             "--data-dir", str(data_dir)]) == 0
    for f in ("screen_paired.json", "selection.json", "report_paired.json"):
        assert json.loads((work / f).read_text()) == json.loads((src / f).read_text()), f
    chosen = "last-self-distill-channels@fold_layers=0-4+15-19,strength=2"
    assert json.loads((work / "selection.json").read_text())["chosen"] == {"smollm2-135m": chosen}
    screen = {r: {"diff": d, "gap": 0.2} for r, d in (("a", 0.04), ("b", 0.05), ("c", 0.02))}
    guard = {r: {"diff": 0.0} for r in screen} | {"b": {"diff": -0.006}}  # b loses MMLU: out
    assert fold_screen.select(screen, guard, {"a": 0.03, "b": 0.05, "c": 0.03}) == "a"
    assert fold_screen.select(screen, guard, {"a": 0.029, "b": 0.05, "c": 0.03}) == "paper"
    with pytest.raises(RuntimeError, match="guard .* missing for a"):  # a passes the screen and the cut
        fold_screen.select(screen, {"b": guard["b"]}, {"a": 0.03, "b": 0.05, "c": 0.03})


def test_readme_fold_rebuilds_the_held_out_smollm2_models(tmp_path):
    """The README's `pear fold` command (and its seed-1 variant) rebuilds, from the committed coefficients, exactly
    the scales of the two folders round 14's report half evaluated (their committed pear.json), and the fold is
    verified (folded logits = hooked logits)."""
    import re
    import shlex

    from pear.cli import main

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    command = re.search(r"pear fold --model smollm2-135m .*?coefficients\.json", readme, re.S).group(0)
    argv = shlex.split(command.replace("\\\n", " "))[1:]
    runs = repo / "benchmarks/results/recipe_study_round14/smollm2-135m/runs/smollm2-135m"
    seed1 = "benchmarks/results/recipe_study_round14/smollm2-135m/runs/smollm2-135m/fit-lsdc-s1/coefficients.json"
    assert seed1 in readme
    for evaluated, coefficients in (("lsdc_L0-4+15-19_x2", None), ("lsdc_L0-4+15-19_x2-seed1", seed1)):
        args = list(argv)
        args[args.index("--out") + 1] = str(tmp_path / evaluated)
        i = args.index("--coefficients") + 1
        args[i] = str(repo / (coefficients or args[i]))
        assert main(args) == 0
        made = json.loads((tmp_path / evaluated / "pear.json").read_text())
        want = json.loads((runs / evaluated / "pear.json").read_text())
        assert made["heads"] == want["heads"] and len(made["heads"]) == 90
        assert made["verification"]["max_abs_logit_diff"] <= made["verification"]["tolerance"]


def test_fold_screen_reads_two_rounds_screened_in_one_evaluation(tmp_path, data_dir):
    """Round 16 screened its 16 cuts and round 15's three in one evaluation of Qwen2.5-Coder-0.5B (four
    processes, one set of parts): each round's names.json picks its own candidates from the parts, the
    rebuilt files equal the committed ones, and neither round chooses anything."""
    import shutil

    import fold_screen

    src = Path(__file__).resolve().parent.parent / "benchmarks/results/recipe_study_round16/qwen2.5-coder-0.5b"
    for names, suffix, count in (("names.json", "", 19), ("names_round15.json", "_round15", 3)):
        work = tmp_path / names
        work.mkdir()
        for name in ("parts", names, "length_check_h1.json"):
            (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, work / name)
        assert fold_screen.main(["--work", str(work), "--model", "qwen2.5-coder-0.5b", "--names", str(work / names),
                                 "--data-dir", str(data_dir)]) == 0
        for f in ("screen_paired", "selection"):
            assert json.loads((work / f"{f}.json").read_text()) == json.loads((src / f"{f}{suffix}.json").read_text()), f
        sel = json.loads((work / "selection.json").read_text())
        assert sel["chosen"] == {"qwen2.5-coder-0.5b": "paper"} and len(sel["delta"]["qwen2.5-coder-0.5b"]) == count
        assert max(sel["delta"]["qwen2.5-coder-0.5b"].values()) < 0.03  # no cut reaches the rule's +3 points


def test_profile_decode_runs_continuous_static_with_the_tasks_stopping_rule(smollm2_bf16, data_dir, tmp_path,
                                                                            monkeypatch):
    """benchmarks/profile_decode.py on CPU with a tiny llama: the eager loop and continuous-static (through
    fewer slots than prompts, stopping as pear eval does) profile the same prompts, and the JSON says
    what ran."""
    import profile_decode

    folder = _tiny_llama_folder(smollm2_bf16.tokenizer, tmp_path)
    monkeypatch.setenv("PEAR_DATA", str(data_dir))
    args = ["--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--task", "closedbook", "--batch", "5",
            "--new-tokens", "4", "--rows", "3"]
    for extra in ([], ["--decode", "continuous-static", "--slots", "2", "--stop", "task"]):
        out = tmp_path / f"p{len(extra)}.json"
        assert profile_decode.main(args + extra + ["--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["rows"] == 5 and res["profiled_seconds"] > 0 and set(res["seconds"]) == {"1 new tokens", "4 new tokens"}
        assert (res["decode"], res["stop"]) == (("continuous-static", "task") if extra else ("eager", "none"))
        assert 0 < res["new_tokens"]["4 new tokens"] <= 20 and res["new_tokens"]["1 new tokens"] <= 5
    assert res["new_tokens"]["4 new tokens"] <= json.loads((tmp_path / "p0.json").read_text())["new_tokens"]["4 new tokens"]
    ph = res["phases"]  # continuous-static's run split by phase: 5 prompts over 2 slots join at least 3 times
    assert ph["joins"] >= 3 and 1 <= ph["steps"] <= 20 and ph["prefill_s"] > 0 and ph["step_s"] > 0
    assert ph["total_s"] == pytest.approx(ph["prefill_s"] + ph["step_s"] + ph["rest_s"])


def test_decode_attention_compares_kernels_against_float64(tmp_path):
    """benchmarks/decode_attention.py on CPU: SDPA and the two matrix products agree with the float64
    reference on ranged masks; a kernel the device lacks (FlashAttention on CPU) is recorded as failed,
    and the JSON keeps the command and the shape."""
    import decode_attention

    out = tmp_path / "att.json"
    assert decode_attention.main(["--device", "cpu", "--dtype", "fp32", "--rows", "6", "--length", "40",
                                  "--iters", "2", "--kernels", "sdpa,matmul,flash", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kernels"]["sdpa"]["max_abs_err"] < 1e-5 and res["kernels"]["matmul"]["max_abs_err"] < 1e-5
    assert res["kernels"]["sdpa"]["us"] > 0 and "error" in res["kernels"]["flash"]
    assert res["shape"]["rows"] == 6 and res["command"].startswith("python3 benchmarks/decode_attention.py")


def test_stop_rule_cost_times_both_rules(smollm2_bf16, tmp_path):
    """benchmarks/stop_rule_cost.py: the stopping rule's host time per step with and without the gate,
    saved with the command."""
    import stop_rule_cost

    out = tmp_path / "cost.json"
    assert stop_rule_cost.main(["--rows", "16", "--steps", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["ms_per_step"]) == {"every token", "gated"} and all(v > 0 for v in res["ms_per_step"].values())
    assert res["gate_tokens"] > 0 and res["command"].endswith("--out " + str(out))
