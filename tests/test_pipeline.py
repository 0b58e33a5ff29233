"""`pear run` / `pear.run`: discover -> fit -> fold -> verify -> save, and report.md."""

import json

import pytest
import torch

import pear
from pear.cli import main
from pear.errors import PearError
from pear.proxy import copy_loss, make_batch
from pear.folding import read_coefficients
from tiny_models import tiny_model

FILES = ["model", "heads.json", "heads.png", "coefficients.json", "coefficients.png", "fit_loss.png", "report.md"]


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_run_api_tiny_writes_everything(tiny_folder, tmp_path):
    out = tmp_path / "run"
    res = pear.run(str(tiny_folder), out, k=3, method="fast", discovery_settings="6x8", top_m=8, steps=4, batch=4,
                   length=16, eval_batch=4, lr=0.1, progress=False)
    assert isinstance(res, pear.RunResult)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert not list(tmp_path.glob("*.ckpt")) and not list(tmp_path.glob(".run*"))  # no leftovers
    assert all(_is_png(res.figures[k]) for k in ("heatmap", "coefficients", "fit_loss"))
    # the result mirrors the files
    assert res.k == 3 and len(res.heads) == 3 and [h["rank"] for h in res.heads] == [1, 2, 3]
    assert read_coefficients(res.coefficients_path) == pytest.approx(res.coefficients)
    heads = json.loads(res.heads_path.read_text())
    assert heads["top_k"] == 3 and [(h["layer"], h["head"]) for h in heads["heads"][:3]] == [
        (h["layer"], h["head"]) for h in res.heads]
    meta = json.loads((out / "model" / "pear.json").read_text())
    assert meta["pear_run"]["k"] == 3 and meta["base_model"] == str(tiny_folder)
    assert set(res.seconds) == {"load", "discover", "fit", "fold + verify", "save", "total"}
    assert set(res.versions) >= {"pear", "torch", "transformers"}
    report = res.report_path.read_text()
    for h in res.heads:  # every coefficient visible at a glance
        assert f"| {h['rank']} | {h['layer']} | {h['head']} |" in report
        assert f"{h['coefficient']:.4f}" in report
    for name in ("heads.png", "coefficients.png", "fit_loss.png"):
        assert f"]({name})" in report
    assert "provisional" in report and "--k 3" in report


def test_run_refuses_nonempty_out_before_any_work(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", "--model", str(tiny_folder), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(PearError, match="--k must be"):
        pear.run(str(tiny_folder), tmp_path / "x", k="many")


def test_run_ctrl_c_then_same_command_resumes(tiny_folder, tmp_path, ctrl_c_at_step, capsys):
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_folder), "--out", str(out), "--k", "2", "--discovery-settings", "6x8",
            "--top-m", "4", "--steps", "4", "--batch", "2", "--length", "8", "--eval-batch", "2", "--no-progress"]
    ctrl_c_at_step(2)
    assert main(argv) == 130
    ckpt = tmp_path / "run.fit.ckpt"
    assert ckpt.exists() and not out.exists()
    assert "run the same command again to resume" in capsys.readouterr().err
    ctrl_c_at_step(None)
    assert main(argv) == 0
    assert not ckpt.exists()
    fit_info = json.loads((out / "coefficients.json").read_text())["fit"]
    assert fit_info["resumed_from_step"] == 2 and len(fit_info["losses"]) == 4


def test_default_out_and_effect_words():
    from pear.pipeline import default_out
    from pear.report import effect

    assert str(default_out(None)).endswith("smollm2-135m-pear")
    assert [effect(a) for a in (-0.3, 0.0, 0.6, 1.0, 1.4)] == ["FLIPPED", "removed", "weakened", "unchanged", "amplified"]


def test_candidate_names_the_study_s_variants():
    """report.md finds a fit's measured effect under the study's name for it: the recipe, with
    the options the fit changed (a longer fit's own warm-up is not a change)."""
    from pear.recipes import candidate_name, recipe_settings

    name = lambda r, **o: candidate_name(r, recipe_settings(r, **o).as_dict())  # noqa: E731
    assert name("paper") == "paper" and name("paper", lr=0.02) == "paper@lr=0.02"
    assert name("retrieval-channels", anchor=100.0) == "retrieval-channels@anchor=100"
    assert name("paper", steps=80) == "paper@steps=80"
    assert name("paper", steps=80, warmup=3) == "paper@steps=80,warmup=3"
    assert name("retrieval-channels", anchor=100.0, anchor_source="questions") == \
        "retrieval-channels@anchor=100,anchor_source=questions"
    assert candidate_name("not-a-recipe", {}) == "not-a-recipe"


def test_recipe_effects_in_reports_match_the_recorded_screen():
    """report.md's table of what a recipe did (pear.recipes.MEASURED) is the screen's recorded
    paired statistics (BENCHMARKS.md §5), rounded as printed; a model that is not a preset is
    told its effect is unknown."""
    from pathlib import Path

    from pear.recipes import (HELD_OUT, HELD_OUT_CUT, HELD_OUT_CUT20, HELD_OUT_OTHER, MEASURED, RECIPES,
                              candidate_name, canonical_name, measured_text, recipe_settings)

    results = Path(__file__).resolve().parent.parent / "benchmarks/results"
    studies = [results / "recipe_study_round4", results / "recipe_study_round7"]  # 4: round 3's parts; 7: Gemma's 3-7
    screens = studies + [results / "recipe_study_round10" / m for m in ("smollm2-135m", "gemma3-270m")] + \
        [results / "recipe_study_round11" / m for m in ("smollm2-135m", "qwen2.5-coder-0.5b")] + \
        [results / "recipe_study_round12" / "smollm2-135m", results / "recipe_study_round14" / "smollm2-135m",
         results / "recipe_study_round16" / "qwen2.5-coder-0.5b",  # round 16 screened round 15's three again
         results / "recipe_study_round9" / "qwen2.5-coder-1.5b"] + \
        [results / "recipe_study_round17" / m for m in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")]
    seen = set()
    for study in screens:
        for key, v in json.loads((study / "screen_paired.json").read_text()).items():
            m, r = key.split("/")
            r = canonical_name(r)  # the study's name as typed -> the name a fit of those settings gets
            seen.add(f"{m}/{r}")
            assert MEASURED[r][m] == (round(100 * v["diff"], 1), float(f"{v['p_mcnemar']:.2g}"))
    assert seen == {f"{m}/{r}" for r, rows in MEASURED.items() for m in rows}
    assert {c.partition("@")[0] for c in MEASURED} <= set(RECIPES)
    assert "has not been measured" in measured_text("a-recipe-of-ones-own", "gemma3-270m")
    assert all(canonical_name(c) == c for c in [*MEASURED, *HELD_OUT])  # each found under its fit's name:
    fit = {**recipe_settings("long-copy").as_dict(), "scales": "query-heads", "strength": 2.0}
    assert "| qwen2.5-coder-1.5b | -0.6 |" in measured_text(candidate_name("long-copy", fit), "gemma3-270m")

    def by_seed(rows):  # {candidate: {preset: {seed: value}}} -> {candidate: {preset: [value per seed]}}
        return {c: {m: [v[s] for s in sorted(v)] for m, v in ms.items()} for c, ms in rows.items()}

    held, other, cut = {}, {}, {}  # the report half: mdqa-20 per seed, the other tasks (seed 0), cut to 20 words
    folds = results / "recipe_study_round14" / "smollm2-135m"  # a fold-only round: labels named in names.json
    names = json.loads((folds / "names.json").read_text())
    for study in studies + [folds]:
        keep = (lambda label: label != "paper") if study == folds else (lambda label: True)  # round 3's paper stands
        for m, tasks in json.loads((study / "report_paired.json").read_text()).items():
            for label, v in ((lab, v) for lab, v in tasks["mdqa-20"].items() if keep(lab)):
                name, _, seed = label.partition("-seed")
                held.setdefault(name, {}).setdefault(m, {})[int(seed or 0)] = (
                    round(100 * v["diff"], 1), float(f"{v['p_mcnemar']:.2g}"))
            for task in ("kv", "closedbook", "mmlu"):
                for label, v in tasks.get(task, {}).items():
                    if "-seed" not in label and keep(label):
                        other.setdefault(label, {}).setdefault(m, {})[task] = (round(100 * v["diff"], 1),
                                                                              float(f"{v['p_mcnemar']:.2g}"))
        for m, rows in json.loads((study / "length_check_h2.json").read_text()).items():
            for label, row in rows.items():
                label = names[label] if study == folds and label != "base" else label
                if label != "base" and keep(label):
                    c, (name, _, seed) = row["by_words"][str(HELD_OUT_CUT)], label.partition("-seed")
                    cut.setdefault(name, {}).setdefault(m, {})[int(seed or 0)] = (
                        round(100 * c["diff"], 1), float(f"{c['p']:.2g}"))
    assert by_seed(held) == HELD_OUT
    assert other == HELD_OUT_OTHER
    assert by_seed(cut) == HELD_OUT_CUT20
    text = measured_text("retrieval-channels", "gemma3-270m")
    assert "(this model) | +20.6 |" in text and "(this model) | +17.9 (p=1e-42) | +17.1 (p=5e-39) |" in text
    assert "| +17.9 (p=6.3e-44) / +17.3 (p=9e-41) |" in text
    assert "mmlu -1.3 (p=0.0063)" in text
    text = measured_text("retrieval-channels@anchor=100", "gemma3-270m")  # a recipe with --anchor 100
    assert "(this model) | +17.8 |" in text and "mmlu -0.8 (p=0.04)" in text
    text = measured_text("retrieval-channels@anchor=50,anchor_source=questions", "gemma3-270m")  # Gemma's default
    assert "(this model) | +13.5 (p=1.9e-31) | +14.6 (p=1.3e-35) |" in text and "mmlu -0.1 (p=0.85)" in text
    text = measured_text("retrieval-channels@steps=3,anchor=50,anchor_source=questions", "gemma3-270m",
                         "retrieval-channels@anchor=50,anchor_source=questions")  # the default with --steps 3
    assert text.startswith("This run ran as retrieval-channels@steps=3,") and "| +14.2 |" in text
    text = measured_text("paper@steps=3,batch=2", "smollm2-135m")  # a setting not measured: the recipe's own
    assert text.startswith("This run changed steps=3, batch=2 from recipe `paper`")
    assert "Measured effect of recipe `paper`" in text and "| smollm2-135m (this model) | +0.8 |" in text
    assert "unknown until `pear eval`" in measured_text("paper", "/my/model")


def test_preset_defaults_are_the_choices_that_pass_the_default_rule():
    """PRESET_DEFAULTS names a preset's recipe only where the study chose it on half 1 (the last
    round's selection.json) and its report half passes rule 4 (BENCHMARKS.md §5): above base on
    mdqa-20 for both seeds (p < 0.05), MMLU within ±0.5 points, KV and closed-book not
    significantly lower (seed 0)."""
    from pathlib import Path

    from pear.recipes import HELD_OUT, HELD_OUT_OTHER, PRESET_DEFAULTS, default_recipe

    passing = {}
    for name, rows in HELD_OUT.items():
        for m, seeds in rows.items():
            other = HELD_OUT_OTHER.get(name, {}).get(m, {})
            if name != "paper" and len(seeds) == 2 and all(d > 0 and p < 0.05 for d, p in seeds) \
                    and set(other) == {"kv", "closedbook", "mmlu"} and abs(other["mmlu"][0]) <= 0.5 \
                    and not any(other[t][0] < 0 and other[t][1] < 0.05 for t in ("kv", "closedbook")):
                passing.setdefault(m, set()).add(name)
    folded = "last-self-distill-channels@fold_layers=0-4+15-19,strength=2"
    assert passing == {"gemma3-270m": {"oracle-distill-channels", "retrieval-channels@anchor=50,anchor_source=questions"},
                       "smollm2-135m": {folded}}
    results = Path(__file__).resolve().parent.parent / "benchmarks/results"
    chosen = {**json.loads((results / "recipe_study_round7/selection.json").read_text())["chosen"],  # Gemma's last round
              **json.loads((results / "recipe_study_round14/smollm2-135m/selection.json").read_text())["chosen"]}
    assert PRESET_DEFAULTS == {m: chosen[m] for m in passing} == {
        "gemma3-270m": "retrieval-channels@anchor=50,anchor_source=questions", "smollm2-135m": folded}
    assert default_recipe("gemma3-270m") == PRESET_DEFAULTS["gemma3-270m"]
    assert default_recipe(None, "cpu") == "paper"  # SmolLM2's recipe is its default on CUDA alone (GPU_ONLY_DEFAULTS)


def test_recipe_names_change_a_recipe():
    """RECIPE@KEY=VALUE,... is the recipe with those settings changed (typed as FitSettings'), named
    back the same way in reports; `--recipe` refuses a bad one with one usage line."""
    from pear.recipes import candidate_name, get_recipe, recipe_settings, split_name

    name = "retrieval-channels@anchor=50,anchor_source=questions"
    assert split_name(name) == ("retrieval-channels", {"anchor": 50.0, "anchor_source": "questions"})
    fs = recipe_settings(name, seed=1)
    assert (fs.anchor, fs.anchor_source, fs.scales, fs.objective, fs.seed) == (50.0, "questions", "channels",
                                                                              "retrieval", 1)
    assert get_recipe(name).description.endswith("with anchor = 50, anchor_source = questions")
    assert candidate_name(name, fs.as_dict()) == name
    assert candidate_name(name, recipe_settings(name, lr=0.02).as_dict()) == \
        "retrieval-channels@lr=0.02,anchor=50,anchor_source=questions"
    assert split_name("paper@steps=80,lr=0.02") == ("paper", {"steps": 80, "lr": 0.02})
    held = "last-self-distill-channels@hold=0.5"  # an objective's option changes the recipe's, keeping the others
    fs = recipe_settings(held, steps=10)
    assert fs.objective_options == {**get_recipe("last-self-distill-channels").fit["objective_options"], "hold": 0.5}
    assert candidate_name(held, fs.as_dict()) == "last-self-distill-channels@steps=10,hold=0.5"
    assert candidate_name("last-self-distill-channels@hold=0", recipe_settings("last-self-distill-channels@hold=0")
                          .as_dict()) == "last-self-distill-channels"
    for bad in ("nosuch", "paper@steps=8.5", "paper@dtype=fp32", "paper@lr", "paper@lr=", "paper@hold=half"):
        with pytest.raises(PearError):
            split_name(bad)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--recipe", "paper@steps=many", "--out", "x"])
    assert e.value.code == 2


def test_the_summary_line_names_the_fits_own_objective_where_it_has_one():
    """Every fit measures the copy proxy; a fit of another objective also reports that objective's
    held-out loss (and the anchor's KL) on its summary line, not the proxy's alone."""
    from pear.fit import metrics_text

    copy = metrics_text({"proxy_loss": 2.0, "copy_accuracy": 0.5}, {"proxy_loss": 1.5, "copy_accuracy": 0.6})
    assert copy == "held-out proxy loss 2.000 -> 1.500, copy accuracy 0.500 -> 0.600"
    other = metrics_text({"proxy_loss": 2.0, "copy_accuracy": 0.5, "objective_loss": 0.8, "anchor_kl": 0.0},
                         {"proxy_loss": 2.1, "copy_accuracy": 0.5, "objective_loss": 0.6, "anchor_kl": 0.01})
    assert other.startswith(copy.split(" -> 1.500")[0])
    assert other.endswith("objective loss 0.800 -> 0.600, anchor KL 0.000 -> 0.010")


@pytest.mark.real
def test_pear_run_real_model(tmp_path, smollm2, capsys):
    """Small settings on the real default model: the saved folder reloads with plain
    transformers, copies better than the base model on a fresh held-out proxy batch, and
    its coefficients moved away from 1."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--k", "4", "--discovery-settings", "10x20", "--top-m", "8", "--steps", "10",
               "--batch", "6", "--lr", "0.05", "--eval-batch", "8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "held-out proxy loss" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)

    coefs = read_coefficients(out / "coefficients.json")
    assert len(coefs) == 4 and max(abs(a - 1) for a in coefs.values()) > 0.05
    assert min(coefs.values()) >= 0  # default bounds: nonneg

    new = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers, no pear
    base, tok = smollm2
    assert next(new.parameters()).dtype == torch.float32  # GGUF base: saved in its fp32 dequantised form
    batch = make_batch(tok, base.get_input_embeddings().weight.shape[0], 16, 50, seed=20240929)  # unseen
    with torch.no_grad():
        base_loss = float(copy_loss(base(batch.input_ids, use_cache=False).logits, batch))
        new_loss = float(copy_loss(new(batch.input_ids, use_cache=False).logits, batch))
    assert new_loss < base_loss - 0.02, (base_loss, new_loss)

    data = json.loads((out / "coefficients.json").read_text())
    assert data["fit"]["after"]["proxy_loss"] < data["fit"]["before"]["proxy_loss"]
    report = (out / "report.md").read_text()
    assert "smollm2-135m" in report and "Seconds per stage" in report
    assert "Measured effect of recipe `paper`" in report and "| smollm2-135m (this model) | +0.8 |" in report


class _StopAfterDiscovery(Exception):
    pass


@pytest.mark.parametrize("knee_past_16", [False, True])
def test_cpu_k_auto_rescores_exactly_every_head_it_picks(tiny_folder, tmp_path, monkeypatch, knee_past_16):
    """On CPU, --k auto re-scores the top 16 exactly first and the top 32 only when the chosen K
    reaches past them: either way every chosen head has an exact score."""
    import pear.discover as disc_mod
    import pear.heads as heads_mod
    import pear.pipeline as pipe

    calls, chosen = [], {}

    def fake_discover(model, tok, **kw):  # a 6 x 8 model's scores; exact for the top `top_m`
        calls.append(kw["top_m"])
        L, H = 6, 8
        n = 20 if knee_past_16 else 6  # heads that stand out; then 8 barely positive, the rest negative
        rank = torch.arange(L * H, dtype=torch.float32)
        flat = torch.where(rank < n, 1.0 - 1e-3 * rank, torch.where(rank < n + 8, 1e-3, -0.5))
        perm = torch.randperm(L * H, generator=torch.Generator().manual_seed(0))
        exact = torch.zeros(L * H, dtype=torch.bool)
        exact[perm[: kw["top_m"]]] = True  # perm[i] holds rank i's score
        scores = torch.empty(L * H)
        scores[perm] = flat
        return disc_mod.DiscoveryResult(scores=scores.reshape(L, H), method="fast", settings=[(4, 6)], seed=0,
                                        seconds=0.0, forward_equivalents=0.0, exact=exact.reshape(L, H),
                                        extra={"top_m": kw["top_m"]})

    def stop(model, tok, heads, *a, **kw):
        chosen["heads"], chosen["exact"] = heads, calls[-1]
        raise _StopAfterDiscovery

    monkeypatch.setattr(disc_mod, "discover", fake_discover)
    monkeypatch.setattr(pipe, "fit", stop)
    monkeypatch.setattr(heads_mod, "K_AUTO_RANGE", (4, 32))
    with pytest.raises(_StopAfterDiscovery):
        pear.run(str(tiny_folder), tmp_path / "run", k="auto", method="fast", progress=False)
    assert calls == ([16, 32] if knee_past_16 else [16])
    assert len(chosen["heads"]) <= chosen["exact"]
