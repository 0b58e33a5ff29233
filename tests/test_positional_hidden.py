"""The positional-hidden variant (pear.baselines.positional_hidden): a residual channel scaled in
the query and key inputs, applied as a weight edit that is undone on leaving."""

import numpy as np
import pytest
import torch
from tiny_models import CONFIGS, VOCAB, tiny_llama, tiny_model

from pear.baselines import get_variant
from pear.baselines import positional_hidden as ph
from pear.errors import PearError
from pear.families import FAMILIES
from pear.loading import LoadedModel, ModelSpec


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_family_table_names_the_query_and_key_projections(model_type):
    model = tiny_model(model_type)
    if FAMILIES[model_type].qk_proj is None:
        with pytest.raises(PearError, match=f"{model_type} computes them in one fused projection"):
            ph.qk_projections(model)
        return
    pairs = ph.qk_projections(model)
    assert len(pairs) == 2
    for q, k in pairs:
        assert isinstance(q, torch.nn.Linear) and isinstance(k, torch.nn.Linear)
        assert q.in_features == k.in_features == 64 and q is not k


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi", "opt", "gptj"])
def test_weight_edit_equals_scaling_the_inputs_and_is_undone(model_type):
    """Columns `dims` of W_q and W_k times the factor = those input channels times the factor
    (hooks on the projections' inputs); leaving restores every weight bit for bit."""
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    dims, layers, factor = [3, 17, 40], [0, 1], -3.0
    scale = torch.ones(64)
    scale[dims] = factor
    hooks = [proj.register_forward_pre_hook(lambda m, a: (a[0] * scale,) + a[1:])
             for layer in layers for proj in ph.qk_projections(model)[layer]]
    with torch.no_grad():
        want = model(ids).logits
        for h in hooks:
            h.remove()
        base = model(ids).logits
        with ph.scaled(model, dims, layers, factor):
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the edit changes the model
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_search_finds_a_smooth_monotonic_channel():
    """Of random channels, one that rises smoothly with position in every layer and one that
    rises with noise, the smooth one ranks first; a flat random model yields no candidate."""
    rng = np.random.default_rng(0)
    L, T, d = 8, 300, 12
    hidden = rng.normal(0, 1, (L, T, d))
    pos = np.linspace(0, 1, T)
    hidden[:, :, 5] = 3 * np.log1p(20 * pos) + rng.normal(0, 0.01, (L, T))
    hidden[:, :, 9] = 3 * pos + rng.normal(0, 0.3, (L, T))
    found = ph.positional_dims(hidden, candidates=3)
    assert found[0] == 5
    assert ph.positional_dims(rng.normal(0, 1, (L, T, d))) == []


def test_default_layers_follow_the_reference_fractions():
    assert ph.default_layers(32) == list(range(10, 26))  # the reference configs' layers 10-25
    assert ph.default_layers(30)[0] == 9 and ph.default_layers(30)[-1] == 23


def test_auto_search_and_choice_end_to_end(monkeypatch, capsys, smollm2_bf16):
    """dims=auto: mean hidden states, candidates, validation losses on fresh key-value prompts,
    the lowest chosen and applied; the base model comes back untouched. Bad options: one line."""
    tok = smollm2_bf16.tokenizer
    model = tiny_llama(tok, layers=6)
    loaded = LoadedModel(model, tok, ModelSpec("tiny", "folder", "/nonexistent/tiny"))
    monkeypatch.setattr(ph, "VALIDATION", dict(records=2, pairs=4))
    chosen = {}
    real_choose = ph.choose_dim

    def spy(*a, **k):
        dim, losses = real_choose(*a, **k)
        chosen.update(dim=dim, losses=losses, candidates=a[2])
        return dim, losses

    monkeypatch.setattr(ph, "choose_dim", spy)
    monkeypatch.setattr(ph, "positional_dims", lambda hidden, candidates=10: [7, 30, 41][:candidates])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = tok("The key is", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        with get_variant("positional-hidden").wrap(loaded, candidates=2, samples=2) as lm:
            got = lm(ids).logits
            info = lm.pear_variant_info  # what `pear eval` saves as the model's variant_info
    assert info["dims"] == [chosen["dim"]] and info["search"]["candidates"] == [7, 30]
    losses = {"base" if d is None else str(d): v for d, v in chosen["losses"].items()}
    assert info["search"]["validation_loss"] == losses
    assert not hasattr(model, "pear_variant_info")  # gone with the edit
    assert chosen["candidates"] == [7, 30] and set(chosen["losses"]) == {None, 7, 30}
    assert chosen["dim"] == min((7, 30), key=lambda d: chosen["losses"][d])
    assert f"chosen {chosen['dim']}" in capsys.readouterr().err
    assert (got - base).abs().max() > 0
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    with get_variant("positional-hidden").wrap(loaded, dims=7, factor=1.0) as lm:  # factor 1: the base exactly
        torch.testing.assert_close(lm(ids).logits, base, rtol=0, atol=0)
    for bad, match in [(dict(dims=64), "dims must be within 0..63"), (dict(dims=3, layers="4-9"), "layers must be"),
                       (dict(dims="x"), "dims must be 'auto'"), (dict(samples=0), "samples must be"),
                       (dict(dims=3, factor="half"), "factor must be a number"), (dict(candidates=0), "candidates must")]:
        with pytest.raises(PearError, match=match):
            with get_variant("positional-hidden").wrap(loaded, **bad):
                pass
    with pytest.raises(PearError, match="needs the model's tokenizer"):
        with get_variant("positional-hidden").wrap(model):
            pass
    assert get_variant("positional-hidden").options == ["dims", "layers", "factor", "candidates", "samples", "seed"]


@pytest.mark.real
def test_search_on_the_real_model_is_seeded(smollm2):
    """On SmolLM2-135M the search runs on the model's own residual stream and gives the same
    channels for the same seed (a small sample here; the variant's default is 64 x 1,000 tokens)."""
    a = ph.positional_dims(ph.mean_hidden_states(smollm2.model, 2, 300, seed=0), candidates=5)
    b = ph.positional_dims(ph.mean_hidden_states(smollm2.model, 2, 300, seed=0), candidates=5)
    assert a == b and 0 < len(a) <= 5 and all(0 <= d < 576 for d in a)
