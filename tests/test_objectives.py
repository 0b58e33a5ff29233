"""Objectives for the coefficients and the parameterisations (pear/objectives, pear/folding).

Batches are seeded, put the answer where their metadata says, and read no evaluation file;
every parameterisation folds exactly; a short fit with each objective lowers its own loss.
"""

import json
import random

import pytest
import torch

import pear.evaluate.data as data
from pear.cli import main
from pear.errors import PearError
from pear.fit import FitSettings, fit
from pear.heads import all_heads
from pear.objectives import OBJECTIVES, get_objective, squad
from pear.recipes import RECIPES
from pear.folding import HeadScaling, fold, read_coefficients, unfold
from tiny_models import tiny_model

SMALL = {"long-copy": {"context": 96, "span": 12}, "retrieval": {"documents": 3, "words": 30},
         "position-distill": {"documents": 3, "words": 30}}
KV = {"source": "kv", "pairs": 4}


def _obj(name, opts, data_dir):
    return get_objective(name, opts, data_dir)


@pytest.mark.real
@pytest.mark.data
@pytest.mark.parametrize("name,opts", [("long-copy", SMALL["long-copy"]), ("retrieval", SMALL["retrieval"]),
                                       ("retrieval", KV), ("position-distill", SMALL["position-distill"])])
def test_batches_are_a_function_of_the_seed(smollm2, data_dir, name, opts):
    m, tok = smollm2.model, smollm2.tokenizer
    o = _obj(name, opts, data_dir)
    a, b, c = o.batch(m, tok, 4, seed=5), o.batch(m, tok, 4, seed=5), o.batch(m, tok, 4, seed=6)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]


def test_long_copy_repeats_the_span_from_its_depth():
    m = tiny_model("llama")
    o = get_objective("long-copy", {"context": 80, "span": 10})
    seqs = o.batch(m, None, 16, seed=0)
    depths = set()
    for s in seqs:
        d, n = s.meta["depth"], 10
        assert len(s.ids) == 80 and s.n_target == n - 1
        assert s.ids[d:d + n] == s.ids[-n:]  # the repeat copies the span at depth d
        filler = s.ids[:d] + s.ids[d + n:-n]
        assert not set(filler) & set(s.ids[-n:])  # the continuation is determined
        depths.add(d)
    assert len(depths) > 8  # a random depth, not a fixed one


@pytest.mark.real
@pytest.mark.data
def test_retrieval_puts_the_answer_in_the_gold_document(smollm2, data_dir):
    tok = smollm2.tokenizer
    o = get_objective("retrieval", {"documents": 5, "words": 40}, data_dir)
    seqs = o.batch(smollm2.model, tok, 24, seed=1)
    golds = set()
    for s in seqs:
        text = tok.decode(s.ids[:-s.n_target])
        assert tok.decode(s.ids[-s.n_target:]).strip() == s.meta["answer"].strip()
        docs = text.split("Document [")[1:]
        assert len(docs) == 5
        hits = [i for i, d in enumerate(docs) if s.meta["answer"] in d]
        assert s.meta["gold_index"] in hits
        golds.add(s.meta["gold_index"])
    assert len(golds) >= 4  # uniformly random positions
    inner = get_objective("retrieval", {"documents": 20, "words": 20, "gold": "inner"}, data_dir)
    golds = [s.meta["gold_index"] for s in inner.batch(smollm2.model, tok, 40, seed=1)]
    assert set(golds) <= set(range(4, 16)) and len(set(golds)) >= 8  # the inner three fifths only
    with pytest.raises(PearError, match="gold must be one of"):
        get_objective("retrieval", {"gold": "middle"}, data_dir)


@pytest.mark.real
def test_kv_retrieval_queries_the_pair_at_its_index(smollm2):
    tok = smollm2.tokenizer
    o = get_objective("retrieval", {"source": "kv", "pairs": 6})
    for s in o.batch(smollm2.model, tok, 8, seed=2):
        prompt = tok.decode(s.ids[:-s.n_target])
        lines = prompt.split("JSON data:\n")[1].split("\n\nKey:")[0].splitlines()
        key = prompt.split('Key: "')[1].split('"')[0]
        assert key in lines[s.meta["gold_index"]] and s.meta["answer"] in lines[s.meta["gold_index"]]


@pytest.mark.real
@pytest.mark.data
def test_position_distill_pairs_first_with_middle(smollm2, data_dir):
    tok = smollm2.tokenizer
    o = get_objective("position-distill", {"documents": 5, "words": 40}, data_dir)
    for s in o.batch(smollm2.model, tok, 6, seed=3):
        assert 1 <= s.meta["gold_index"] <= 3  # neither first nor last
        student = tok.decode(s.ids).split("Document [")[1:]
        teacher = tok.decode(s.teacher_ids).split("Document [")[1:]
        assert s.meta["answer"] in teacher[0]
        assert s.meta["answer"] in student[s.meta["gold_index"]]
        assert s.ids[-s.n_target:] == s.teacher_ids[-s.n_target:]  # same answer tokens scored


@pytest.mark.real
@pytest.mark.data
def test_position_distill_oracle_teacher_and_uniform_student(smollm2, data_dir):
    tok = smollm2.tokenizer
    o = get_objective("position-distill", {"documents": 4, "words": 30, "teacher": "oracle",
                                           "student": "uniform"}, data_dir)
    batch = o.batch(smollm2.model, tok, 24, seed=5)
    assert {s.meta["gold_index"] for s in batch} == {0, 1, 2, 3}  # the ends are drawn too
    for s in batch:
        student = tok.decode(s.ids).split("Document [")[1:]
        teacher = tok.decode(s.teacher_ids).split("Document [")[1:]
        assert len(student) == 4 and len(teacher) == 1 and s.meta["teacher_documents"] == 1
        assert s.meta["answer"] in teacher[0] and s.meta["answer"] in student[s.meta["gold_index"]]
        assert s.ids[-s.n_target:] == s.teacher_ids[-s.n_target:]
    again = o.batch(smollm2.model, tok, 24, seed=5)
    assert [s.ids for s in again] == [s.ids for s in batch]
    with pytest.raises(PearError, match="teacher must be"):
        get_objective("position-distill", {"teacher": "middle"}, data_dir)


@pytest.mark.real
@pytest.mark.data
def test_position_distill_last_teacher_reads_the_same_passages_with_the_gold_one_last(smollm2, data_dir):
    tok = smollm2.tokenizer
    o = get_objective("position-distill", {"documents": 4, "words": 30, "teacher": "last", "student": "uniform"},
                      data_dir)
    for s in o.batch(smollm2.model, tok, 12, seed=7):
        student = tok.decode(s.ids).split("Document [")[1:]
        teacher = tok.decode(s.teacher_ids).split("Document [")[1:]
        assert len(student) == len(teacher) == 4 and s.meta["teacher_gold_index"] == 3
        assert s.meta["answer"] in teacher[3] and s.meta["answer"] in student[s.meta["gold_index"]]
        titles = sorted(t.split("(Title: ")[1].split(")")[0] for t in teacher)
        assert titles == sorted(t.split("(Title: ")[1].split(")")[0] for t in student)  # the same passages
        assert s.ids[-s.n_target:] == s.teacher_ids[-s.n_target:]


@pytest.mark.real
@pytest.mark.data
def test_position_distill_hold_gives_the_student_the_teachers_prompt_in_that_share(smollm2, data_dir):
    """hold=h: in about a share h of the sequences the student reads the gold passage where the
    teacher does (its prompt is the teacher's, so the KL there is zero at scales 1); hold 0 draws
    nothing for it, so the batches of the recipes without it are unchanged."""
    tok = smollm2.tokenizer
    opts = {"documents": 4, "words": 30, "teacher": "last", "student": "uniform"}
    batch = get_objective("position-distill", {**opts, "hold": 0.6}, data_dir).batch(smollm2.model, tok, 30, seed=7)
    held = [s for s in batch if s.ids == s.teacher_ids]
    assert 10 <= len(held) <= 27 and all(s.meta["gold_index"] == 3 for s in held)
    assert {s.meta["gold_index"] for s in batch if s not in held} <= {0, 1, 2, 3}
    plain = get_objective("position-distill", opts, data_dir)
    assert [s.ids for s in plain.batch(smollm2.model, tok, 6, seed=7)] == \
        [s.ids for s in get_objective("position-distill", {**opts, "hold": 0.0}, data_dir).batch(smollm2.model, tok, 6,
                                                                                                  seed=7)]
    first = get_objective("position-distill", {"documents": 4, "words": 30, "hold": 0.99}, data_dir)
    assert all(s.meta["gold_index"] == 0 and s.ids == s.teacher_ids for s in first.batch(smollm2.model, tok, 4, seed=1))
    m = smollm2.model
    with torch.no_grad(), HeadScaling(m, all_heads(m), trainable=False) as hs:  # scales 1: held sequences cost nothing
        assert float(plain.loss(m, held[:2], hs)) == pytest.approx(0.0, abs=1e-6)
    for bad, match in [({"hold": 1.0}, "hold must be"), ({"hold": -0.1}, "hold must be"),
                       ({"hold": 0.5, "teacher": "oracle"}, "hold needs teacher")]:
        with pytest.raises(PearError, match=match):
            get_objective("position-distill", bad, data_dir)


@pytest.mark.real
@pytest.mark.data
def test_position_distill_target_teacher_is_the_models_own_right_answer(smollm2, data_dir):
    """target=teacher: the answer tokens are the model's greedy answer to the oracle prompt (a
    plain one-sequence greedy loop gives the same tokens), up to and with the token that ends its
    first line or turn, and only answers that contain a gold answer are kept."""
    from pear.evaluate.generate import eos_token_ids
    from pear.evaluate.metrics import qa_score
    from pear.objectives.position_distill import ANSWER_TOKENS

    m, tok = smollm2.model, smollm2.tokenizer
    opts = {"documents": 4, "words": 30, "teacher": "oracle", "student": "uniform", "target": "teacher"}
    o = get_objective("position-distill", opts, data_dir)
    batch = o.batch(m, tok, 2, seed=7)
    eos = eos_token_ids(m, tok)
    assert len(batch) == 2
    for s in batch:
        a = s.ids[-s.n_target:]
        assert a == s.teacher_ids[-s.n_target:]
        ids = s.teacher_ids[:-s.n_target]
        with torch.no_grad():
            for t in a:  # greedy, one sequence, no cache
                assert int(m(torch.tensor([ids])).logits[0, -1].argmax()) == t
                ids = ids + [t]
        assert a[-1] in eos or "\n" in tok.decode(a) or len(a) == ANSWER_TOKENS
        assert qa_score(tok.decode(a, skip_special_tokens=True), s.meta["gold_answers"]) == 1.0
        assert s.meta["answer"] == tok.decode(a, skip_special_tokens=True)
        student = tok.decode(s.ids).split("Document [")[1:]
        assert len(student) == 4 and s.meta["gold_answers"][0] in student[s.meta["gold_index"]]
    assert [s.ids for s in o.batch(m, tok, 2, seed=7)] == [s.ids for s in batch]
    with pytest.raises(PearError, match="target must be"):
        get_objective("position-distill", {"target": "model"}, data_dir)


@pytest.mark.real
@pytest.mark.data
def test_position_distill_target_teacher_says_when_the_model_cannot_answer(smollm2, data_dir, monkeypatch):
    """A model that never answers right gets one clear error after a bounded number of draws."""
    import pear.objectives.position_distill as PD

    monkeypatch.setattr(PD, "qa_score", lambda output, answers: 0.0)
    monkeypatch.setattr(PD, "teacher_answers", lambda model, tok, prompts: [[tok.eos_token_id]] * len(prompts))
    o = get_objective("position-distill", {"documents": 3, "words": 30, "teacher": "oracle", "target": "teacher"},
                      data_dir)
    with pytest.raises(PearError, match="answered only 0 of 40 .* use target=gold"):
        o.batch(smollm2.model, smollm2.tokenizer, 2, seed=0)


def test_the_fit_makes_its_batches_with_the_scales_off(monkeypatch):
    """Batches are made by the base model (a teacher's own answers must not come from the scaled
    model): no scaling hook is on the output projections while an objective makes its batch."""
    from pear.families import resolve
    from pear.objectives.proxy_copy import Copy

    m = tiny_model("llama")
    projs, hooked, orig = resolve(m).out_projs, [], Copy.batch

    def spy(self, model, tokenizer, n, seed):
        hooked.append(sum(len(p._forward_pre_hooks) for p in projs))
        return orig(self, model, tokenizer, n, seed)

    monkeypatch.setattr(Copy, "batch", spy)
    fit(m, None, [(0, 1), (1, 2)], FitSettings(steps=2, batch=2, length=8, eval_batch=2, lr=0.1), progress=False)
    assert hooked == [0, 0]


@pytest.mark.real
@pytest.mark.data
def test_objectives_read_no_evaluation_file(smollm2, data_dir, monkeypatch):
    read = []
    real = data.data_file
    monkeypatch.setattr(data, "data_file", lambda d, rel: read.append(rel) or real(d, rel))
    squad.load.cache_clear()
    for name in ("retrieval", "position-distill"):
        _obj(name, SMALL[name], data_dir).batch(smollm2.model, smollm2.tokenizer, 2, seed=0)
    squad.load.cache_clear()
    assert read and set(read) == {data.SQUAD}


def test_objective_options_and_data_are_checked_before_work(tmp_path):
    with pytest.raises(PearError, match="unknown option"):
        get_objective("long-copy", {"documents": 3})
    with pytest.raises(PearError, match="context >= 2"):
        get_objective("long-copy", {"context": 10, "span": 8})
    with pytest.raises(PearError, match="unknown objective"):
        FitSettings(objective="nope")
    with pytest.raises(PearError, match="not found"):
        get_objective("retrieval", {}, tmp_path).check_data()
    get_objective("retrieval", {"source": "kv"}, tmp_path).check_data()  # synthetic: needs no data


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("scales", ["heads", "all-heads", "channels"])
def test_every_parameterisation_folds_exactly(family, scales):
    m = tiny_model(family)
    torch.manual_seed(1)
    heads = [(0, 1), (1, 3)] if scales == "heads" else all_heads(m)
    D = m.config.hidden_size // m.config.num_attention_heads if family != "qwen3" else 16
    coefs = {h: ((0.5 + torch.rand(D)).tolist() if scales == "channels" else float(0.5 + torch.rand(())))
             for h in heads}
    ids = torch.randint(0, 128, (2, 24))
    before = {n: p.clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        base = m(ids).logits
        with HeadScaling(m, coefs, trainable=False):
            hooked = m(ids).logits
        fold(m, coefs)
        folded = m(ids).logits
        unfold(m, coefs)
    assert (hooked - base).abs().max() > 1e-3  # the scales do something
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)


@pytest.mark.real
@pytest.mark.data
@pytest.mark.parametrize("name,opts,scales", [("long-copy", SMALL["long-copy"], "all-heads"),
                                              ("retrieval", SMALL["retrieval"], "all-heads"),
                                              ("retrieval", KV, "channels"),
                                              ("position-distill", SMALL["position-distill"], "all-heads"),
                                              ("position-distill", {**SMALL["position-distill"], "teacher": "oracle",
                                                                    "student": "uniform"}, "channels")])
def test_a_short_fit_lowers_its_own_loss(smollm2, data_dir, monkeypatch, name, opts, scales):
    """Six steps on one fixed batch (every step draws the same seed) lower the objective's loss
    on that batch: the gradient through the scales is right for every objective."""
    import pear.fit as F

    m, tok = smollm2.model, smollm2.tokenizer
    monkeypatch.setattr(F, "train_seed", lambda seed, step: 123)
    w = {n: p.clone() for n, p in m.named_parameters() if "o_proj" in n}
    r = fit(m, tok, all_heads(m), FitSettings(steps=6, batch=2, eval_batch=2, lr=0.02, objective=name,
            objective_options=opts, scales=scales), progress=False, data_dir=data_dir)
    o = get_objective(name, opts, data_dir)
    batch = o.batch(m, tok, 2, 123)
    with torch.no_grad(), HeadScaling(m, all_heads(m), trainable=False, channels=scales == "channels") as hs:
        before = float(o.loss(m, batch, hs))
    with torch.no_grad(), HeadScaling(m, r.coefficients, trainable=False) as hs:
        after = float(o.loss(m, batch, hs))
    assert after < 0.95 * before
    assert all(torch.equal(p, w[n]) for n, p in m.named_parameters() if n in w)  # the model is untouched
    if scales == "channels":
        assert all(len(a) == 64 for a in r.coefficients.values())


def _cli_fit_tiny(tmp_path, scales: str):
    """`pear fit` of a tiny llama folder, two long-copy steps with `scales`: (the folder, coefficients.json)."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    c = tmp_path / "c.json"
    assert main(["fit", "--model", str(folder), "--objective", "long-copy", "--objective-option", "context=64",
                 "--objective-option", "span=8", "--scales", scales, "--penalty", "0.1", "--steps", "2",
                 "--batch", "2", "--eval-batch", "2", "--out", str(c), "--dtype", "fp32"]) == 0
    return folder, c


def test_cli_fit_channels_then_fold(tmp_path, capsys):
    folder, c = _cli_fit_tiny(tmp_path, "channels")
    saved = json.loads(c.read_text())
    assert saved["granularity"] == "channel" and len(saved["heads"]) == 8
    coefs = read_coefficients(c)
    assert all(isinstance(a, list) and len(a) == 16 for a in coefs.values())
    assert main(["fold", "--model", str(folder), "--coefficients", str(c), "--out", str(tmp_path / "f"),
                 "--dtype", "fp32"]) == 0
    assert (tmp_path / "f" / "pear.json").is_file()


def test_cli_fit_scales_on_some_layers_only(tmp_path, capsys):
    """--layers with every-head scales fits the heads of those layers alone ('+' joins ranges; a recipe
    name may set it); a layer the model lacks, a malformed value or --scales heads is one clear error."""
    from pear.recipes import get_recipe
    from pear.settings import parse_layers

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    c = tmp_path / "c.json"
    base = ["fit", "--model", str(folder), "--objective", "long-copy", "--objective-option", "context=64",
            "--objective-option", "span=8", "--scales", "channels", "--steps", "1", "--batch", "2",
            "--eval-batch", "2", "--out", str(c), "--dtype", "fp32"]
    assert main(base + ["--layers", "1"]) == 0
    assert sorted({r["layer"] for r in json.loads(c.read_text())["heads"]}) == [1]
    assert len(read_coefficients(c)) == 4 and json.loads(c.read_text())["fit"]["settings"]["layers"] == "1"
    assert main(base + ["--layers", "0-5", "--force"]) == 2
    assert "has layers 0..1" in capsys.readouterr().err
    assert main(base + ["--layers", "1-0", "--force"]) == 2
    assert "ranges A-B" in capsys.readouterr().err
    assert parse_layers("0-4+15-19") == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19] and parse_layers("7") == [7]
    with pytest.raises(PearError, match="needs every-head scales"):
        FitSettings(layers="0-3")
    assert get_recipe("last-self-distill-channels@layers=0-4+15-19").fit["layers"] == "0-4+15-19"
    assert FitSettings(scales="channels", layers="").result_key() == FitSettings(scales="channels").result_key()


def test_run_folds_the_kept_scales_at_a_strength(tmp_path):
    """--fold-layers / --strength (recipe keys fold_layers, strength): the same fit, and what it folds
    is `pear fold --layers --strength` of the plain fit's coefficients, weight for weight; the report
    says so, the fit's checkpoint key is the plain fit's."""
    from transformers import AutoModelForCausalLM

    from pear.recipes import candidate_name, get_recipe

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    base = ["run", "--model", str(folder), "--objective", "long-copy", "--objective-option", "context=64",
            "--objective-option", "span=8", "--scales", "channels", "--steps", "2", "--batch", "2",
            "--eval-batch", "2", "--dtype", "fp32", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "all")]) == 0
    assert main(base + ["--fold-layers", "1", "--strength", "2.5", "--out", str(tmp_path / "kept")]) == 0
    assert main(["fold", "--model", str(folder), "--coefficients", str(tmp_path / "all" / "coefficients.json"),
                 "--layers", "1", "--strength", "2.5", "--out", str(tmp_path / "ref")]) == 0
    kept = read_coefficients(tmp_path / "kept" / "coefficients.json")
    assert sorted({l for l, _ in kept}) == [1] and len(kept) == 4
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "kept" / "model").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    report = (tmp_path / "kept" / "report.md").read_text()
    assert "folded: those of layers 1 kept, each scale's distance from 1 times 2.5" in report
    assert "--fold-layers 1 --strength 2.5" in report  # the command that makes it again
    fs = FitSettings(scales="channels", fold_layers="15-19", strength=2.0)
    assert fs.result_key() == FitSettings(scales="channels").result_key()  # the same fit, resumable
    r = get_recipe("last-self-distill-channels@fold_layers=15-19,strength=2").fit
    assert (r["fold_layers"], r["strength"]) == ("15-19", 2.0)
    assert candidate_name("last-self-distill-channels", {**r}) == "last-self-distill-channels@fold_layers=15-19,strength=2"
    with pytest.raises(PearError, match="ranges A-B"):
        FitSettings(fold_layers="3-1")
    with pytest.raises(PearError, match="keep none of the fitted layers"):
        FitSettings(scales="channels", layers="0-4", fold_layers="15-19")
    with pytest.raises(PearError, match="strength must be a finite number"):
        FitSettings(strength=float("nan"))


def test_paper_recipe_is_the_papers_setting():
    fs = FitSettings(**RECIPES["paper"].fit)
    assert (fs.objective, fs.scales, fs.steps, fs.batch, fs.length, fs.lr, fs.penalty) == \
        ("copy", "heads", 60, 20, 50, 5e-3, 0.0)
    assert fs.result_key() == FitSettings().result_key()
    assert set(RECIPES) >= {"paper", "long-copy", "retrieval", "retrieval-channels", "position-distill",
                            "oracle-distill", "oracle-distill-channels"}
    assert all(FitSettings(**r.fit).objective in OBJECTIVES for r in RECIPES.values())


def _run_until_fit(tmp_path, monkeypatch):
    """A tiny model folder, and pear.run stopped where it would fit: the FitSettings it built land in `seen`."""
    import pear.pipeline as P

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    seen = {}

    def stop(model, tok, heads, fs, **kw):
        seen["fs"] = fs
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "fit", stop)
    return P, folder, seen


def test_run_keeps_the_settings_object(tmp_path, monkeypatch):
    """pear.run(settings=...) is not overridden by run's own keyword defaults."""
    P, folder, seen = _run_until_fit(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        P.run(str(folder), tmp_path / "out", settings=FitSettings(bounds="unit", seed=3, scales="all-heads"),
              progress=False, dtype="fp32")
    assert (seen["fs"].bounds, seen["fs"].seed, seen["fs"].scales) == ("unit", 3, "all-heads")
    with pytest.raises(PearError, match="not both"):  # a keyword would override the object: refused, not silent
        P.run(str(folder), tmp_path / "out2", settings=FitSettings(bounds="unit"), bounds="nonneg", progress=False)
    assert not (tmp_path / "out2").exists()


def test_a_preset_default_recipe_applies_only_without_recipe(tmp_path, monkeypatch):
    """A preset listed in PRESET_DEFAULTS gets its recipe when none is named, on the command
    line and in pear.run; --recipe still wins, and any other model gets the paper's recipe."""
    import argparse

    import pear.recipes as R
    from pear.commands.fit import add_fit_args, k_from_args, recipe_from_args, settings_from_args

    def args(*argv, model="smollm2-135m"):
        p = argparse.ArgumentParser()
        p.add_argument("--model", default=None)
        add_fit_args(p)
        return p.parse_args(["--model", model, *argv] if model else list(argv))

    assert R.default_recipe("smollm2-135m", "cpu") == R.DEFAULT_RECIPE and settings_from_args(args()).objective == "copy"
    monkeypatch.setattr(R, "PRESET_DEFAULTS", {"smollm2-135m": "long-copy"})
    monkeypatch.setattr(R, "GPU_ONLY_DEFAULTS", set())
    assert recipe_from_args(args()) == "long-copy" and recipe_from_args(args(model=None)) == "long-copy"
    assert settings_from_args(args()).objective == "long-copy" and settings_from_args(args()).scales == "all-heads"
    assert k_from_args(args()) == "auto"
    assert settings_from_args(args("--recipe", "paper")).objective == "copy"
    assert recipe_from_args(args(model="/some/folder")) == "paper"

    P, folder, seen = _run_until_fit(tmp_path, monkeypatch)
    monkeypatch.setattr(R, "PRESET_DEFAULTS", {str(folder): "long-copy"})  # as if this folder were a preset
    with pytest.raises(KeyboardInterrupt):
        P.run(str(folder), tmp_path / "out", progress=False, dtype="fp32", steps=1)
    assert seen["fs"].objective == "long-copy" and seen["fs"].steps == 1
    with pytest.raises(KeyboardInterrupt):
        P.run(str(folder), tmp_path / "out", progress=False, dtype="fp32", recipe="paper", force=True)
    assert seen["fs"].objective == "copy"


@pytest.mark.real
@pytest.mark.data
def test_the_knowledge_anchor_keeps_plain_text_predictions(smollm2, data_dir):
    """The same retrieval fit with and without `anchor`: the anchored scales change the model's
    next-token distribution on held-out plain paragraphs less; the anchor is 0 at alpha = 1."""
    from pear.objectives import anchor
    from pear.settings import anchor_seed

    m, tok = smollm2.model, smollm2.tokenizer
    held = anchor.batch(tok, data_dir, 2, anchor_seed(0, -1))  # the fit's eval_batch
    assert held == anchor.batch(tok, data_dir, 2, anchor_seed(0, -1)) != anchor.batch(tok, data_dir, 2, anchor_seed(0, 0))

    def kl(coefficients):
        with torch.no_grad(), HeadScaling(m, coefficients, trainable=False) as hs:
            return sum(float(anchor.loss(m, [s], hs)) for s in held) / len(held)

    heads = all_heads(m)
    assert kl({h: [1.0] * 64 for h in heads}) == pytest.approx(0.0, abs=1e-6)
    s = FitSettings(steps=3, batch=1, eval_batch=2, lr=0.05, objective="retrieval",
                    objective_options=SMALL["retrieval"], scales="channels")
    free = fit(m, tok, heads, s, progress=False, data_dir=data_dir)
    held_fit = fit(m, tok, heads, s, anchor=20.0, progress=False, data_dir=data_dir)
    assert held_fit.after["anchor_kl"] == pytest.approx(kl(held_fit.coefficients), rel=1e-3)
    assert kl(held_fit.coefficients) < 0.7 * kl(free.coefficients)
    assert held_fit.settings.result_key()["anchor"] == 20.0 and "anchor" not in s.result_key()  # old keys hold


@pytest.mark.real
@pytest.mark.data
def test_the_question_anchor_reads_the_answer_distribution(smollm2, data_dir):
    """anchor_source=questions: closed-book SQuAD 2.0 questions, rendered as the evaluation renders
    them, the KL where the answer's first token is predicted; 0 at alpha = 1, > 0 once scaled; a fit
    with it records the source in its key and its held-out KL."""
    from pear.evaluate.prompts import closedbook_prompt
    from pear.objectives import anchor
    from pear.objectives.retrieval import encode
    from pear.settings import anchor_seed

    m, tok = smollm2.model, smollm2.tokenizer
    qs = anchor.batch(tok, data_dir, 3, anchor_seed(0, 0), "questions")
    items, _ = squad.load(str(data_dir), anchor.WORDS)
    for s in qs:  # a question prompt and one placeholder token; no passage
        text = tok.decode(s[:-1])
        assert "Question: " in text and "\nAnswer:" in text and "Document" not in text and len(s) < 150
        q = text.split("Question: ")[1].split("\nAnswer:")[0]  # the rest: the chat template's, as evaluated
        assert s[:-1] == encode(tok, closedbook_prompt(q), "")[0] and any(i.question == q for i in items)
    heads = all_heads(m)

    def kl(value):
        with torch.no_grad(), HeadScaling(m, {h: [value] * 64 for h in heads}, trainable=False) as hs:
            return float(anchor.loss(m, qs, hs, "questions"))

    assert kl(1.0) == pytest.approx(0.0, abs=1e-6) and kl(0.5) > 1e-3
    s = FitSettings(steps=1, batch=1, eval_batch=1, objective="retrieval", objective_options=SMALL["retrieval"],
                    scales="channels", anchor=1.0, anchor_source="questions")
    r = fit(m, tok, heads, s, progress=False, data_dir=data_dir)
    assert r.settings.result_key()["anchor_source"] == "questions" and r.after["anchor_kl"] >= 0
    assert "anchor_source" not in FitSettings(anchor=1.0).result_key()  # paragraphs: old keys hold
    with pytest.raises(PearError, match="unknown anchor source"):
        FitSettings(anchor_source="essays")


def test_anchor_is_checked_before_work(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    args = ["fit", "--model", str(folder), "--scales", "all-heads", "--steps", "1", "--batch", "1",
            "--out", str(tmp_path / "c.json")]
    assert main(args + ["--anchor", "-1"]) != 0
    assert "anchor must be a number >= 0" in capsys.readouterr().err
    monkeypatch.setenv("PEAR_DATA", str(tmp_path / "nowhere"))
    assert main(args + ["--anchor", "1"]) != 0
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "bloom", "opt"])
def test_sequences_of_different_lengths_share_a_pass(family):
    """A batch of sequences of different lengths gives each row's log-probabilities and the
    scales' gradient as the sequences alone would (right padding, no mask: no NaN from fully
    masked rows), for rotary (with a sliding window), absolute and ALiBi positions."""
    from pear.objectives import answer_logprobs

    m = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (40, 23, 90, 9)]
    n_targets = [5, 3, 8, 2]

    def grad_and_logp(batch, n):
        with HeadScaling(m, all_heads(m), trainable=True, channels=True) as hs:
            lp, tgt, mask = answer_logprobs(m, batch, n, pad_id=0)
            (-(lp.gather(-1, tgt[..., None]).squeeze(-1) * mask).sum()).backward()
            return lp.detach(), tgt, mask, hs.alpha.grad.clone()

    lp, tgt, mask, grad = grad_and_logp(seqs, n_targets)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    alone = [grad_and_logp([s], [n]) for s, n in zip(seqs, n_targets)]
    A = max(n_targets)
    for i, (lp1, tgt1, _, _) in enumerate(alone):
        k = n_targets[i]
        assert mask[i].tolist() == [False] * (A - k) + [True] * k
        assert tgt[i, A - k:].tolist() == seqs[i][-k:] == tgt1[0].tolist()
        torch.testing.assert_close(lp[i, A - k:], lp1[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, sum(a[3] for a in alone), atol=1e-4, rtol=1e-4)


def test_a_gpu_only_default_keeps_the_papers_recipe_without_cuda(tmp_path, monkeypatch, capsys):
    """A preset whose confirmed recipe needs a GPU (GPU_ONLY_DEFAULTS) gets it on CUDA only: on a CPU
    `pear run` fits the paper's recipe (minutes, the README's first command) and says, on stderr and
    in report.md, which recipe it would have used and how to ask for it; --recipe still wins."""
    import pear.recipes as R

    assert R.PRESET_DEFAULTS["smollm2-135m"] in R.HELD_OUT and "smollm2-135m" in R.GPU_ONLY_DEFAULTS
    assert R.default_recipe("smollm2-135m", "cpu") == R.default_recipe(None, "cpu") == "paper"
    note = R.default_note(None, "cpu")
    assert f"--recipe {R.PRESET_DEFAULTS['smollm2-135m']}" in note and "+2.7 / +2.9" in note and "pear fold" in note
    assert R.default_note("gemma3-270m", "cpu") is None and R.default_note("/my/model", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert R.default_recipe("smollm2-135m") == R.PRESET_DEFAULTS["smollm2-135m"]
    assert R.default_note("smollm2-135m") is None
    monkeypatch.undo()

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    monkeypatch.setattr(R, "PRESET_DEFAULTS", {str(folder): "long-copy"})  # as if this folder were such a preset
    monkeypatch.setattr(R, "GPU_ONLY_DEFAULTS", {str(folder)})
    common = ["--model", str(folder), "--steps", "1", "--batch", "2", "--dtype", "fp32", "--no-progress"]
    assert main(["run", *common, "--out", str(tmp_path / "r")]) == 0
    assert "recipe paper: without a GPU" in capsys.readouterr().err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Chosen by default: recipe paper" in report and "--recipe long-copy" in report
    assert json.loads((tmp_path / "r" / "model" / "pear.json").read_text())["pear_run"]["objective"] == "copy"
    assert main(["run", *common, "--recipe", "paper", "--out", str(tmp_path / "named")]) == 0
    assert "Chosen by default" not in (tmp_path / "named" / "report.md").read_text()


def test_a_preset_default_recipe_that_reads_data_says_so(tmp_path, monkeypatch, capsys):
    """Without --recipe a preset may get a recipe that reads SQuAD 2.0; with no data folder the one
    error line says which recipe that is and that --recipe paper needs no data. Named recipes keep
    the plain message."""
    import pear.recipes as R
    from pear.cli import main

    monkeypatch.delenv("PEAR_DATA", raising=False)
    monkeypatch.setattr(R, "PRESET_DEFAULTS", {"smollm2-135m": "oracle-distill-channels"})
    monkeypatch.setattr(R, "GPU_ONLY_DEFAULTS", set())
    assert main(["run", "--model", "smollm2-135m", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "gets recipe 'oracle-distill-channels'" in err and "--recipe paper" in err and err.count("\n") == 1
    assert main(["fit", "--model", "smollm2-135m", "--out", str(tmp_path / "c.json")]) == 2
    assert "gets recipe 'oracle-distill-channels'" in capsys.readouterr().err
    assert main(["run", "--model", "smollm2-135m", "--recipe", "oracle-distill-channels", "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "PEAR_DATA" in err and "gets recipe" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c.json").exists()


def test_squad_sample_passes_over_an_item_whose_answer_is_in_every_passage(tmp_path):
    """A one-letter answer is a substring of every passage, so no distractor can be found for it:
    the sample draws another item instead of drawing distractors for ever."""
    import gzip

    def article(title, context, qa=None):  # one paragraph, with one question when `qa` = (question, answer)
        qas = [] if qa is None else [{"question": qa[0], "is_impossible": False,
                                      "answers": [{"text": qa[1], "answer_start": context.index(qa[1])}]}]
        return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}

    arts = [article("Letters", "The letter e is in every passage here.", ("Which letter?", "e")),
            article("France", "Paris is the capital of France.", ("Capital of France?", "Paris"))]
    arts += [article(f"Other {k}", f"Some other text number {k} there.") for k in range(6)]
    f = tmp_path / data.SQUAD
    f.parent.mkdir(parents=True)
    with gzip.open(f, "wt") as fh:
        json.dump({"version": "v2.0", "data": arts}, fh)
    squad.load.cache_clear()
    try:
        rng = random.Random(0)
        got = [squad.sample(str(tmp_path), 100, 4, rng) for _ in range(20)]
        with pytest.raises(PearError, match="too few passages"):  # 8 articles cannot give 19 others
            squad.sample(str(tmp_path), 100, 20, rng)
    finally:
        squad.load.cache_clear()
    assert {item.answers for item, _ in got} == {("Paris",)}
    assert all(len(d) == 3 and all("Paris" not in x for _, x in d) for _, d in got)


def test_cli_fit_query_channels_then_fold_in_each_format(tmp_path, capsys):
    """--scales query-channels fits scales on the heads' queries: the coefficients file says its site,
    `pear fold` folds them into the query projection (pear.json says so; the output projection is
    untouched), --format peft writes them as IA3 on the query projection (--format gguf: the real
    model's test in test_export.py; a folder without a GGUF file is refused in one line, nothing
    written). A recipe name may set the scales (RECIPE@scales=...)."""
    from pear.recipes import candidate_name, get_recipe

    folder, c = _cli_fit_tiny(tmp_path, "query-channels")
    saved = json.loads(c.read_text())
    assert saved["site"] == "query" and saved["granularity"] == "channel" and len(saved["heads"]) == 8
    coefs = read_coefficients(c)
    assert any(abs(x - 1) > 1e-4 for a in coefs.values() for x in a)  # the fit moved them
    assert main(["fold", "--model", str(folder), "--coefficients", str(c), "--out", str(tmp_path / "f"),
                 "--dtype", "fp32"]) == 0
    assert "(their queries)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "f" / "pear.json").read_text())
    assert meta["site"] == "query"
    from safetensors.torch import load_file

    folded, base = load_file(tmp_path / "f" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert all(torch.equal(folded[n], base[n]) for n in base if "o_proj" in n)
    assert not all(torch.equal(folded[n], base[n]) for n in base if "q_proj" in n)
    assert main(["fold", "--model", str(folder), "--coefficients", str(c), "--out", str(tmp_path / "gguf"),
                 "--format", "gguf"]) == 2
    assert "needs a GGUF base model" in capsys.readouterr().err
    assert not (tmp_path / "gguf").exists()
    assert main(["fold", "--model", str(folder), "--coefficients", str(c), "--out", str(tmp_path / "peft"),
                 "--format", "peft"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["feedforward_modules"] in ([], None)
    assert main(["run", "--model", str(folder), "--objective", "long-copy", "--objective-option", "context=64",
                 "--objective-option", "span=8", "--scales", "query-heads", "--steps", "2", "--batch", "2",
                 "--eval-batch", "2", "--dtype", "fp32", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "model" / "pear.json").read_text())["site"] == "query"
    assert json.loads((run / "coefficients.json").read_text())["site"] == "query"
    assert "folded into the query projection" in (run / "report.md").read_text()
    assert main(["run", "--model", str(folder), "--objective", "long-copy", "--objective-option", "context=64",
                 "--objective-option", "span=8", "--scales", "query-heads", "--steps", "2", "--batch", "2",
                 "--eval-batch", "2", "--dtype", "fp32", "--no-progress", "--format", "peft",
                 "--out", str(tmp_path / "run-peft")]) == 0  # the adapter is written on the base, restored
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    run_coefs = read_coefficients(tmp_path / "run-peft" / "coefficients.json")
    with torch.no_grad():
        want = fold(AutoModelForCausalLM.from_pretrained(folder).eval(), run_coefs, site="query")(ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(),
                                        tmp_path / "run-peft" / "model")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert main(["run", "--model", str(folder), "--scales", "query-heads", "--format", "gguf", "--dtype", "fp32",
                 "--objective", "long-copy", "--out", str(tmp_path / "run-gguf")]) == 2
    assert "needs a GGUF base model" in capsys.readouterr().err
    assert not (tmp_path / "run-gguf").exists()
    q3 = tmp_path / "tiny-qwen3"  # a query norm after the projection: refused after loading, before discovery
    tiny_model("qwen3").save_pretrained(q3)
    assert main(["run", "--model", str(q3), "--scales", "query-heads", "--objective", "long-copy", "--dtype", "fp32",
                 "--no-progress", "--out", str(tmp_path / "run-qwen3")]) == 2
    err = capsys.readouterr().err
    assert "query norm, shared by the heads" in err and "discover" not in err
    assert not (tmp_path / "run-qwen3").exists()
    r = get_recipe("first-self-distill-channels@scales=query-heads")
    assert r.fit["scales"] == "query-heads" and FitSettings(**r.fit).site == "query"
    assert candidate_name("first-self-distill-channels", {"scales": "query-heads"}) == \
        "first-self-distill-channels@scales=query-heads"
