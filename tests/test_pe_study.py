"""The position-embedding study: its training runs on CPU for each of the three model classes,
and pear's whole pipeline (discover, fit, fold, evaluate, report) runs on each checkpoint."""

import json
import math
import re

import pytest
import torch

import pear
from pear.errors import PearError
from pear.study.archs import ARCHS, SIZES, build_model
from pear.study.corpus import TrainingMix, parse_mix, training_passages
from pear.study.pe import main, parse_run_options
from pear.study.train import study_tokenizer

pytestmark = pytest.mark.data

CLASSES = {"rope": "GPTNeoXForCausalLM", "learned": "GPT2LMHeadModel", "alibi": "BloomForCausalLM"}
STEPS = 6
RUN = ["k=3", "method=fast", "discovery_settings=6x8", "top_m=8", "steps=3", "batch=4", "length=16",
       "eval_batch=4", "dtype=fp32", "lr=0.1"]


def _argv(out, **over):
    a = {"--size": "tiny", "--steps": str(STEPS), "--batch": "1", "--window": "128", "--warmup": "1", "--lr": "3e-2", "--heldout-windows": "2",
         "--max-passages": "200", "--tasks": "kv-2,passkey-40,copy-40", "--positions": "first,last", "--limit": "1",
         "--device": "cpu", **over}
    argv = ["--out", str(out), "--no-progress"]
    for k, v in a.items():
        argv += [k, v]
    for r in RUN:
        argv += ["--run-option", r]
    return argv


@pytest.fixture(scope="module")
def tok():
    return study_tokenizer()


@pytest.fixture(scope="module")
def passages(data_dir_module):
    return training_passages(data_dir_module, max_passages=200)


@pytest.fixture(scope="module")
def data_dir_module():
    import os
    from pathlib import Path

    return Path(os.environ["PEAR_DATA"])


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pe") / "study"
    assert main(_argv(out)) == 0
    return out


def test_windows_are_seeded_and_answers_are_right(tok, passages):
    mix = TrainingMix(tok, passages, 256, seed=3, n_windows=8)
    again = TrainingMix(tok, passages, 256, seed=3, n_windows=8)
    assert all(torch.equal(mix[i], again[i]) for i in range(8))
    assert not torch.equal(mix[0], TrainingMix(tok, passages, 256, seed=4, n_windows=1)[0])
    assert not torch.equal(mix[0], mix.heldout(1)[0])
    assert all(mix[i].shape == (256,) for i in range(8))
    rng = __import__("random").Random(0)
    for _ in range(5):
        kv = mix.document("kv", rng)
        key = re.search(r'Key: "([0-9a-f-]{36})"', kv).group(1)
        assert kv.endswith(" " + re.search(f'"{key}": "([0-9a-f-]{{36}})"', kv).group(1))
        pk = mix.document("passkey", rng)
        key = re.search(r"The pass key is (\d{5})\. Remember it", pk).group(1)
        assert pk.endswith(f"The pass key is {key}.")
        cp = mix.document("copy", rng)
        text, tail = cp.rsplit('\n\nContinue the sentence from the text above: "', 1)
        assert tail.endswith('"') and tail[:-1] in text  # prefix + continuation is a sentence of the text
        rep = mix.repeat(rng, 200)  # a span shown twice, then the separator
        n = (len(rep) - 1) // 2
        assert 16 <= n <= 99 and rep[:n] == rep[n:2 * n] and rep[-1] == mix.sep
    assert mix.repeat(rng, 32) is None  # no room for two 16-token halves
    spans = [mix.repeat(__import__("random").Random(k), 600) for k in range(40)]
    assert any(max(r) >= 30_000 for r in spans)  # random halves reach the whole vocabulary
    assert parse_mix("text=1,kv=1") == {"text": 0.5, "kv": 0.5}
    assert parse_mix(None)["repeat"] > 0
    with pytest.raises(PearError, match="text > 0"):
        parse_mix("kv=1")


def test_same_shape_three_position_embeddings(tok):
    shapes = {}
    for arch in ("rope", "learned", "alibi"):
        m = build_model(arch, SIZES["study"], tok, seed=0)
        a = pear.resolve(m)
        assert type(m).__name__ == CLASSES[arch] and a.position == ARCHS[arch].position
        shapes[arch] = (a.n_layers, a.n_heads, a.head_dim, m.config.vocab_size)
        n = sum(p.numel() for p in m.parameters())
        assert 45e6 < n < 55e6  # tens of millions, within 2 % of each other (GPT-2's wpe)
    assert len(set(shapes.values())) == 1


def test_training_lowers_loss_for_each_class(study_dir):
    for arch, cls in CLASSES.items():
        rec = json.loads((study_dir / arch / "base" / "train.json").read_text())
        assert rec["class"] == cls and len(rec["losses"]) == STEPS
        assert set(rec["induction"]) == {"random", "random-seen", "text"}  # pear.study.induction, after training
        assert rec["heldout"][-1]["loss"] < rec["heldout"][0]["loss"] - 0.5
        loaded = pear.load_model(str(study_dir / arch / "base"), device="cpu")
        assert type(loaded.model).__name__ == cls and pear.resolve(loaded.model).position == ARCHS[arch].position
        assert loaded.tokenizer.eos_token == "<|endoftext|>" and not loaded.tokenizer.chat_template


def test_repeat_check_tells_a_copier_from_a_guesser(tok, passages):
    """pear.study.induction: a model that predicts each token from the one n back is perfect on a
    span's second showing and at chance on its first; one that guesses uniformly is at chance on
    both. Training records the check in train.json."""
    from pear.study.induction import KINDS, repeat_check

    V = len(tok)

    class Model(torch.nn.Module):
        def __init__(self, lag):
            super().__init__()
            self.lag, self.w = lag, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, V)  # (B, T, V): uniform
            if self.lag:  # position t predicts x[t + 1] = x[t + 1 - lag] once the span repeats
                B, T = input_ids.shape
                t = torch.arange(self.lag - 1, T)
                logits[:, t, :] = 0.0
                logits[torch.arange(B)[:, None], t[None], input_ids[:, t + 1 - self.lag]] = 50.0
            return type("Out", (), {"logits": logits})()

    n = 20
    copier = repeat_check(Model(n), tok, passages, n=n, batch=2)
    guesser = repeat_check(Model(0), tok, passages, n=n, batch=2)
    for k in KINDS:
        assert copier[k]["top1_second"] == 1.0 and copier[k]["loss_second"] < 0.01
        assert abs(guesser[k]["loss_second"] - math.log(V)) < 0.01 and guesser[k]["top1_second"] < 0.1
        assert copier[k]["loss_first"] > math.log(V) - 0.5  # nothing to copy yet on the first showing


def test_pear_pipeline_on_each_checkpoint(study_dir):
    for arch in CLASSES:
        run = json.loads((study_dir / arch / "pear-paper.run.json").read_text())
        assert run["k"] == 3 and len(run["coefficients"]) == 3
        base = pear.load_model(str(study_dir / arch / "base"), device="cpu").model
        folded = pear.load_model(str(study_dir / arch / "pear-paper" / "model"), device="cpu").model
        ab, af = pear.resolve(base), pear.resolve(folded)
        for key, alpha in run["coefficients"].items():  # the selected heads' columns are scaled by α
            layer, head = (int(v) for v in key.split("."))
            torch.testing.assert_close(af.head_weight(layer, head), alpha * ab.head_weight(layer, head))
        assert any(abs(a - 1) > 1e-4 for a in run["coefficients"].values())


def test_evaluation_and_report(study_dir):
    s = json.loads((study_dir / "study-paper.json").read_text())
    assert list(s["archs"]) == list(CLASSES)
    for arch, a in s["archs"].items():
        assert list(a["tasks"]) == ["kv-2", "passkey-40", "copy-40"]
        for t in a["tasks"].values():
            assert t["n"] == 2 and len(t["by_position"]) == 2 and 0 <= t["base"] <= 1
            assert t["skipped"] == {"base": 0, "pear": 0}
    md = (study_dir / "study-paper.md").read_text()
    assert md.count("| rope |") == 5 and "McNemar" in md  # 3 tasks, the model row, the repeat check
    assert "A 100-token span shown twice" in md
    for name in ("study-paper.png", "heads-paper.png", "train_loss.png", "eval-paper-alibi.png"):
        assert (study_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_recipe_that_scales_every_channel(study_dir):
    """The study with another recipe on the same checkpoints: per-channel scales of every head on
    the retrieval objective (options as JSON, passages cut to fit the 128-token window); no
    discovery runs, so the report has no heat map, and the table's mean α is over channels."""
    opts = ["recipe=retrieval-channels", "steps=2", "batch=2", "dtype=fp32", "eval_batch=4",
            'objective_options={"source": "squad", "documents": 2, "words": 20}']
    argv = _argv(study_dir, **{"--recipe": "retrieval-channels", "--stages": "pear,eval,report"})
    argv = [a for i, a in enumerate(argv) if not (a == "--run-option" or (i and argv[i - 1] == "--run-option"))]
    for o in opts:
        argv += ["--run-option", o]
    assert main(argv) == 0
    run = json.loads((study_dir / "rope" / "pear-retrieval-channels.run.json").read_text())
    assert run["key"]["run_options"]["objective_options"]["documents"] == 2
    assert all(isinstance(v, list) for v in run["coefficients"].values())  # one scale per channel
    assert not (study_dir / "heads-retrieval-channels.png").exists()
    assert "| rope | GPTNeoXForCausalLM |" in (study_dir / "study-retrieval-channels.md").read_text()
    with pytest.raises(PearError, match="objective copy"):  # the recipe's objective decides which options exist
        parse_run_options(['objective_options={"documents": 2}'])


def test_stages_reused_or_refused(study_dir, capsys):
    stamp = (study_dir / "rope" / "base" / "model.safetensors").stat().st_mtime_ns
    assert main(_argv(study_dir, **{"--stages": "train,pear"})) == 0  # same settings: nothing redone
    assert (study_dir / "rope" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(_argv(study_dir, **{"--steps": "7", "--stages": "train"})) == 2
    assert "trained with other settings" in capsys.readouterr().err


def test_bad_input_fails_before_work(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["--out", str(out), "--run-option", "nonsense=1"]) == 2
    assert main(["--out", str(out), "--tasks", "kv-2,nosuchtask"]) == 2
    for bad in ("bounds=sideways", "k=0", "method=slow", "steps=0", "discovery_settings=5"):
        assert main(["--out", str(out), "--run-option", bad]) == 2
    assert main(["--out", str(out), "--stages", "eval"]) == 2 and "run the train and pear stages" in capsys.readouterr().err
    assert main(["--out", str(out), "--archs", "rope,sinusoidal"]) == 2
    assert main(["--out", str(out), "--size", "huge"]) == 2
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--run-option" in capsys.readouterr().out
    assert parse_run_options(["bounds=unit", "k=8", "lr=0.01"]) == {"bounds": "unit", "k": 8, "lr": 0.01}


def test_discovery_exact_on_study_configs(study_dir):
    """The study's configurations (full rotary and sequential residual for GPT-NeoX, among
    others) through discovery's cached suffix re-runs: the same scores as one forward per head."""
    from pear.discover import discover, naive_scores

    settings = [(3, 5), (2, 4)]
    for arch in CLASSES:
        loaded = pear.load_model(str(study_dir / arch / "base"), device="cpu")
        res = discover(loaded.model, loaded.tokenizer, settings=settings, method="exact", batch_heads=3,
                       progress=False)
        ref = naive_scores(loaded.model, loaded.tokenizer, settings=settings)
        assert ref.abs().max() > 1e-5
        torch.testing.assert_close(res.scores, ref, rtol=0, atol=1e-6 + 1e-4 * float(ref.abs().max()))


def test_micro_batches_train_the_same_model(tmp_path, tok, passages):
    """Training in micro-batches (gradient accumulation) gives the whole batch's losses and
    weights up to rounding, so --micro-batch only bounds memory."""
    from pear.study.train import TrainSettings, train

    s = TrainSettings(size="tiny", steps=2, batch=4, window=64, warmup=1, lr=3e-2, heldout_windows=2, max_passages=200)
    whole = train("learned", tmp_path / "a", tok, passages, s, device="cpu", workers=0, progress=False)
    parts = train("learned", tmp_path / "b", tok, passages, s, device="cpu", workers=0, micro_batch=1, progress=False)
    assert parts["micro_batch"] == 1 and whole["micro_batch"] == 4
    assert parts["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    a = pear.load_model(str(tmp_path / "a"), device="cpu").model.state_dict()
    b = pear.load_model(str(tmp_path / "b"), device="cpu").model.state_dict()
    # Adam after 2 steps: rounding only. Adam divides a gradient by its own size, so an embedding row
    # whose gradient is nearly zero can move by a visible fraction of lr (3e-2) on rounding alone:
    # every weight within 1e-3 (3 % of one step), all but 0.01 % of them within 1e-5.
    assert all(torch.allclose(a[k], b[k], atol=1e-3, rtol=0) for k in a)
    far, total = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a), sum(a[k].numel() for k in a)
    assert far <= 1e-4 * total
    with pytest.raises(PearError, match="micro batch"):
        train("learned", tmp_path / "c", tok, passages, s, device="cpu", micro_batch=0, progress=False)
