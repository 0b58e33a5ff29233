"""The rope-bands variant (pear.baselines.rope_bands): the queries' rotary pairs scaled in chosen
layers, as a weight edit (query projection, or the shared query norm) undone on leaving."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from pear.baselines import get_variant
from pear.baselines import rope_bands as rb
from pear.errors import PearError
from pear.families import FAMILIES, resolve
from pear.loading import LoadedModel, ModelSpec

ROPE_QK = ["llama", "qwen2", "qwen3", "gemma3_text", "phi", "gptj"]  # RoPE with a separate query projection


def _query_site(model, layer):
    """The module whose output is the query right before the rotation: the norm where the family has one."""
    fam = resolve(model).family
    blk = model.get_submodule(fam.blocks)[layer]
    return blk.get_submodule(fam.q_norm or fam.qk_proj[0])


@pytest.mark.parametrize("model_type", ROPE_QK)
def test_weight_edit_equals_scaling_the_rotated_pairs_and_is_undone(model_type):
    """The edited weights give the logits of the base model whose queries, right before the
    rotation, have the band's channels multiplied by the factor (a hook); leaving restores every
    weight bit for bit."""
    model = tiny_model(model_type)
    arch = resolve(model)
    D = arch.head_dim
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    layers, factor = [0, 1], 4.0
    width = rb.rotary_width(model, D)
    channels = rb.band_channels(rb.band_pairs("fast", width // 2), width, arch.family.rope_pairs)
    scale = torch.ones(D)
    scale[channels] = factor

    def hook(module, args, out):  # (B, T, H*D) after a projection, (B, H, T, D) after a norm
        return (out.unflatten(-1, (-1, D)) * scale).flatten(-2) if out.shape[-1] != D else out * scale

    handles = [_query_site(model, layer).register_forward_hook(hook) for layer in layers]
    with torch.no_grad():
        want = model(ids).logits
        for h in handles:
            h.remove()
        base = model(ids).logits
        with get_variant("rope-bands").wrap(LoadedModel(model, None, ModelSpec("t", "folder", "t")),
                                            bands="fast", layers=layers, factor=factor) as lm:
            got = lm(ids).logits
            assert lm.pear_variant_info == {"bands": rb.band_pairs("fast", width // 2), "layers": layers,
                                            "factor": factor}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-4  # the edit changes the model
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert not hasattr(model, "pear_variant_info")


@pytest.mark.parametrize("model_type", ["llama", "gptj"])
def test_the_band_channels_are_the_models_own_rotation_pairs(model_type):
    """Scaling a band's channels commutes with the model's rotation (so the edit before the
    rotation equals scaling those pairs' shares of the logits), and scaling a channel without its
    partner does not: the pairing is the model's own (half layout for Llama, interleaved for GPT-J)."""
    import importlib

    model = tiny_model(model_type)
    arch = resolve(model)
    D, width = arch.head_dim, rb.rotary_width(model, arch.head_dim)
    modeling = importlib.import_module(type(model).__module__)
    q = torch.randn(1, 1, 5, D, generator=torch.Generator().manual_seed(1))  # (B, H, T, D)
    if model_type == "gptj":  # rotates the first rotary_dim channels, interleaved, (B, T, H, D)
        sincos = modeling.create_sinusoidal_positions(16, width)[torch.arange(5)][None]
        sin, cos = torch.split(sincos, width // 2, dim=-1)

        def rotate(x):
            x = x.transpose(1, 2)
            r = torch.cat([modeling.apply_rotary_pos_emb(x[..., :width], sin, cos), x[..., width:]], -1)
            return r.transpose(1, 2)
    else:
        cos, sin = model.model.rotary_emb(q, torch.arange(5)[None])

        def rotate(x):
            return modeling.apply_rotary_pos_emb(x, x, cos, sin)[0]
    pairs = rb.band_pairs("1:3", width // 2)
    channels = rb.band_channels(pairs, width, arch.family.rope_pairs)
    assert len(channels) == 4
    scale = torch.ones(D)
    scale[channels] = 3.0
    torch.testing.assert_close(rotate(q * scale), rotate(q) * scale)
    lone = torch.ones(D)
    lone[channels[0]] = 3.0  # half a pair
    assert not torch.allclose(rotate(q * lone), rotate(q) * lone)


def test_bands_and_layers_read_from_options():
    assert rb.band_pairs("fast", 8) == [0, 1] and rb.band_pairs("slow", 8) == [6, 7]
    assert rb.band_pairs("2:5", 8) == [2, 3, 4] and rb.band_pairs(":2", 8) == [0, 1] and rb.band_pairs([7, 1], 8) == [1, 7]
    assert rb.band_channels([0, 1], 16, "half") == [0, 1, 8, 9]
    assert rb.band_channels([0, 1], 16, "interleaved") == [0, 1, 2, 3]
    assert rb.rotary_width(tiny_model("phi"), 16) == 8  # partial rotary: half of the head
    assert rb.rotary_width(tiny_model("gptj"), 16) == 8


@pytest.mark.parametrize("options, match", [
    (dict(bands="middle"), "bands must be"), (dict(bands="5:2"), "bands must be"), (dict(bands=[0, 99]), "bands must be"),
    (dict(factor="x"), "factor must be a number"), (dict(factor=-1), "factor must be >= 0"),
    (dict(layers=[5]), "layers must be within"), (dict(layers="top"), "layers must be 'all'"),
])
def test_bad_options_say_so_and_leave_the_model(options, match):
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PearError, match=match):
        with get_variant("rope-bands").wrap(LoadedModel(model, None, ModelSpec("t", "folder", "t")), **options):
            pass
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("model_type", ["gpt2", "bloom", "gpt_neox"])
def test_models_without_rope_or_a_query_projection_are_refused(model_type):
    model = tiny_model(model_type)
    assert FAMILIES[model_type].position != "rope" or FAMILIES[model_type].qk_proj is None
    with pytest.raises(PearError, match="rope-bands needs RoPE and a separate query projection"):
        with get_variant("rope-bands").wrap(LoadedModel(model, None, ModelSpec("t", "folder", "t"))):
            pass
