"""Coefficient learning (pear/fit.py): frozen model, bounds, resume, errors, K selection.

Fast tests use a tiny random llama (tests/tiny_models.py); the real-model behaviour (proxy
loss goes down) is tested end to end in test_pipeline.py.
"""

import json
import math

import pytest
import torch

import pear.fit as F
from pear.cli import main
from pear.discover import DiscoveryResult
from pear.errors import PearError
from pear.fit import FitSettings, fit
from pear.heads import choose_k, select_heads
from pear.folding import read_coefficients
from tiny_models import tiny_model

HEADS = [(1, 0), (0, 3), (1, 2), (0, 1)]
SMALL = dict(steps=6, batch=4, length=16, eval_batch=4, lr=0.1, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def test_only_alpha_learns_model_untouched(tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    res = fit(tiny, None, HEADS, **SMALL)
    assert res.finished and res.step == 6 and len(res.losses) == 6
    assert all(math.isfinite(v) for v in res.losses)
    assert set(res.coefficients) == set(HEADS)
    assert any(abs(a - 1) > 1e-3 for a in res.coefficients.values())  # it learned something
    for k, v in tiny.state_dict().items():  # weights unchanged, no hooks left behind
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in tiny.parameters())  # flags restored
    assert all(p.grad is None for p in tiny.parameters())
    assert not any(m._forward_pre_hooks for m in tiny.modules())
    assert res.after is not None and set(res.before) == {"proxy_loss", "copy_accuracy"}


def test_model_gradient_is_refused(tiny, monkeypatch):
    """The frozen-model guarantee is checked, not assumed: a leaked gradient stops the fit."""
    real = F._nll

    def leaky(logits, batch):
        w = tiny.get_input_embeddings().weight
        w.requires_grad_(True)  # simulate something un-freezing a weight
        return real(logits, batch) + 0 * w.sum()

    monkeypatch.setattr(F, "_nll", leaky)
    with pytest.raises(RuntimeError, match="received gradients"):
        fit(tiny, None, HEADS, **SMALL)
    tiny.get_input_embeddings().weight.grad = None


@pytest.mark.parametrize("bounds,lo,hi", [("nonneg", 0.0, math.inf), ("unit", 0.0, 1.0)])
def test_bounds_are_enforced(tiny, bounds, lo, hi):
    heads = [(l, h) for l in range(2) for h in range(4)]
    kw = dict(SMALL, steps=20, lr=1.0)
    free = fit(tiny, None, heads, bounds="none", **kw).coefficients.values()
    assert min(free) < 0 and max(free) > 1  # at this lr the unbounded fit flips and amplifies heads
    got = fit(tiny, None, heads, bounds=bounds, **kw).coefficients.values()
    assert min(got) >= lo and max(got) <= hi
    assert min(got) == 0.0  # a head pushed past the bound sits on it


def test_micro_batches_and_grad_checkpointing_give_the_same_fit(tiny):
    ref = fit(tiny, None, HEADS, **SMALL)
    calls = []
    attn = tiny.model.layers[1].self_attn
    h = attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        alt = fit(tiny, None, HEADS, micro_batch=3, grad_checkpointing=True, **SMALL)
    finally:
        h.remove()
    for k in HEADS:
        assert alt.coefficients[k] == pytest.approx(ref.coefficients[k], abs=1e-5)
    # 6 steps x 2 micro-batches, each attention run twice (forward + recompute), plus 2 eval
    # forwards (before, after) x 2 micro-batches
    assert len(calls) == 6 * 2 * 2 + 2 * 2
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny.modules())
    assert not tiny.training and not any(m.training for m in tiny.modules())


def test_a_channel_fit_saves_one_line_per_head_and_reads_back_exactly(tiny, tmp_path):
    """coefficients.json keeps a head's channel scales on one line (indent=2 would give each its own)."""
    res = fit(tiny, None, HEADS, scales="channels", **SMALL)
    path = res.save(tmp_path / "coefficients.json")
    text = path.read_text()
    assert read_coefficients(path) == res.coefficients and json.loads(text) == res.to_json()
    lists = [line.rstrip(",") for line in text.splitlines() if line.lstrip().startswith('"coefficient": [')]
    assert len(lists) == len(res.coefficients) > 1
    assert all(line.endswith("]") and line.count(",") == len(res.coefficients[k]) - 1
               for line, k in zip(lists, sorted(res.coefficients)))


def test_interrupted_fit_resumes_to_the_same_result(tiny, tmp_path, ctrl_c_at_step):
    full = fit(tiny, None, HEADS, **SMALL)
    ckpt = tmp_path / "c.json.ckpt"
    part = fit(tiny, None, HEADS, checkpoint=ckpt, max_steps_this_run=2, **SMALL)
    assert not part.finished and part.step == 2 and part.after is None and ckpt.exists()

    # Ctrl-C during step 4: the checkpoint holds step 3, the last completed one
    ctrl_c_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny, None, HEADS, checkpoint=ckpt, **SMALL)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    ctrl_c_at_step(None)

    done = fit(tiny, None, HEADS, checkpoint=ckpt, **SMALL)
    assert done.finished and done.resumed_from == 3
    assert done.losses == pytest.approx(full.losses, abs=1e-6)
    for k in HEADS:
        assert done.coefficients[k] == pytest.approx(full.coefficients[k], abs=1e-6)
    assert done.before == full.before


def test_checkpoints_come_every_n_steps_or_every_t_seconds(tiny, tmp_path, monkeypatch):
    """A checkpoint after every `checkpoint_every` steps and at the end, and also once
    `checkpoint_seconds` have passed since the last (0: after every step); neither changes the fit."""
    import pear.fit as pf

    saved = []
    monkeypatch.setattr(pf, "save_resume", lambda path, state: saved.append(state["step"]))
    a = fit(tiny, None, HEADS, checkpoint=tmp_path / "a.ckpt", checkpoint_every=4, **SMALL)
    assert saved == [4, 6]
    saved.clear()
    b = fit(tiny, None, HEADS, checkpoint=tmp_path / "b.ckpt", checkpoint_every=100, checkpoint_seconds=0, **SMALL)
    assert saved == [1, 2, 3, 4, 5, 6] and b.coefficients == a.coefficients
    with pytest.raises(PearError, match="checkpoint_seconds must be >= 0"):
        fit(tiny, None, HEADS, checkpoint_seconds=-1, **SMALL)


def test_checkpoint_from_another_fit_is_refused(tiny, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    fit(tiny, None, HEADS, checkpoint=ckpt, max_steps_this_run=1, **SMALL)
    with pytest.raises(PearError, match=r"different fit \(lr: 0.1 -> 0.2\).*--restart"):
        fit(tiny, None, HEADS, checkpoint=ckpt, **dict(SMALL, lr=0.2))
    res = fit(tiny, None, HEADS, checkpoint=ckpt, restart=True, **dict(SMALL, lr=0.2))
    assert res.finished and res.resumed_from == 0


def test_nonfinite_loss_stops_with_a_clear_error(tiny, monkeypatch):
    monkeypatch.setattr(F, "_nll", lambda logits, batch: torch.full(batch.targets.shape, float("nan")) * logits.sum())
    with pytest.raises(PearError, match=r"fit stopped at step 1: training loss is nan .*lower --lr"):
        fit(tiny, None, HEADS, **SMALL)
    assert not any(m._forward_pre_hooks for m in tiny.modules())


def test_settings_validation():
    with pytest.raises(PearError, match="unknown bounds"):
        FitSettings(bounds="positive")
    with pytest.raises(PearError, match="learning rate"):
        FitSettings(lr=float("nan"))
    assert FitSettings().warmup_steps == 6 and FitSettings(steps=5).warmup_steps == 1
    assert F.dataclasses.replace(FitSettings(), steps=2).warmup_steps == 1  # resolved lazily
    assert FitSettings().lr == 5e-3 and FitSettings().steps == 60 and FitSettings().batch == 20
    assert F.heldout_seed(0) not in {F.train_seed(0, s) for s in range(1000)}


def test_choose_k_knee_and_clamps():
    standout = [0.256, 0.115, 0.092, 0.07, 0.06, 0.055, 0.05, 0.02, 0.015, 0.012]
    tail = [0.01 * 0.9 ** i for i in range(100)]
    k, ev = choose_k(standout + tail + [-0.5, -0.1])
    assert 4 <= k <= 12 and ev["positive_heads"] == 110 and ev["k"] == k
    assert choose_k([0.3, 0.2, 0.01, -1.0])[0] == 3  # never more than the positive heads
    assert choose_k([0.3 - 1e-4 * i for i in range(100)] + [1e-3] * 50)[0] == 32  # knee at 100: clamped
    assert choose_k([1.0, 0.01, 0.009, 0.008, 0.007, 0.006, 0.005])[0] == 4  # and at the bottom
    with pytest.raises(PearError, match="all Δπ <= 0"):
        choose_k([-0.1, 0.0])


def test_select_heads_follows_discovery_ranking():
    scores = torch.tensor([[0.05, -0.2, 0.30, 0.01], [0.10, 0.02, -0.01, 0.2]])
    exact = torch.ones_like(scores, dtype=torch.bool)
    exact[1, 3] = False  # an estimate ranks after every exactly scored head
    res = DiscoveryResult(scores=scores, method="fast", settings=[(4, 8)], seed=0, seconds=0.0,
                          forward_equivalents=1.0, exact=exact)
    heads, sc, ev = select_heads(res, 3)
    assert heads == [(0, 2), (1, 0), (0, 0)] and sc[(0, 2)] == pytest.approx(0.30)
    assert ev == {"method": "given", "k": 3}
    with pytest.raises(PearError, match="--k must be in 1..8"):
        select_heads(res, 9)


def _heads_json(tmp_path, n_layers=2, n_heads=4):
    scores = torch.linspace(0.3, -0.1, n_layers * n_heads).view(n_layers, n_heads)
    res = DiscoveryResult(scores=scores, method="exact", settings=[(4, 8)], seed=0, seconds=0.0,
                          forward_equivalents=1.0, model_spec="tiny")
    return res.save(tmp_path / "heads.json", plot=False)


def test_cli_fit_step_limit_then_resume(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    heads = _heads_json(tmp_path)
    out = tmp_path / "coefficients.json"
    argv = ["fit", "--model", str(folder), "--heads", str(heads), "--k", "3", "--out", str(out), "--steps", "4",
            "--batch", "4", "--length", "16", "--eval-batch", "4", "--lr", "0.1", "--dtype", "fp32"]
    assert main(argv + ["--max-steps-this-run", "2"]) == 0
    assert not out.exists() and (tmp_path / "coefficients.json.ckpt").exists()
    assert "run the same command again" in capsys.readouterr().err
    assert main(argv) == 0
    assert not (tmp_path / "coefficients.json.ckpt").exists()
    coefs = read_coefficients(out)  # readable by `pear fold`
    assert set(coefs) == {(0, 0), (0, 1), (0, 2)}
    data = json.loads(out.read_text())
    assert data["fit"]["resumed_from_step"] == 2 and len(data["fit"]["losses"]) == 4
    assert data["fit"]["settings"]["bounds"] == "nonneg" and data["fit"]["k_selection"]["k"] == 3
    assert [r["rank"] for r in data["heads"]] == [1, 2, 3]


def test_cli_fit_nonfinite_is_one_error_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    heads = _heads_json(tmp_path)
    monkeypatch.setattr(F, "_nll", lambda logits, batch: torch.full(batch.targets.shape, float("inf")) + 0 * logits.sum())
    rc = main(["fit", "--model", str(folder), "--heads", str(heads), "--k", "2", "--out", str(tmp_path / "c.json"),
               "--steps", "3", "--batch", "2", "--length", "8", "--eval-batch", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("pear: error: fit stopped at step 1: training loss is inf")
    assert not (tmp_path / "c.json").exists()


def test_cpu_fit_uses_eager_attention_and_restores_sdpa():
    """The fit switches a CPU model to eager attention (faster on short proxy sequences) and back."""
    from pear.training import cpu_attention
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 100, (2, 9))
    ref = model(ids).logits
    with cpu_attention(model):
        assert model.config._attn_implementation == "eager"
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    with cpu_attention(model, short=False):  # long sequences: SDPA is faster on CPU
        assert model.config._attn_implementation == "sdpa"
    from pear.objectives import get_objective
    assert get_objective("copy").short and not get_objective("retrieval", {"source": "kv"}).short


def test_run_estimate_times_the_backward_down_to_layer_0(tiny, monkeypatch):
    """The fit's backward runs down to its first scaled head, which discovery has not chosen when
    `pear run` estimates: the measured step scales a head of layer 0 (the deepest backward), not of
    the last layer (which under-estimated SmolLM2's fit by 40 %)."""
    import pear.folding
    from pear.estimate import estimate_run
    from pear.proxy import parse_settings

    seen, real = [], pear.folding.HeadScaling

    def recording(model, heads, *a, **kw):
        seen.append(list(heads))
        return real(model, heads, *a, **kw)

    monkeypatch.setattr(pear.folding, "HeadScaling", recording)
    est = estimate_run(tiny, None, FitSettings(steps=3, batch=4, length=16, eval_batch=4), parse_settings("4x16"),
                       method="fast", top_m=2)
    assert seen == [[(0, 0)]]
    assert est.step_s > 0 and est.fit_s >= 3 * est.step_s and est.discover_s > 0
