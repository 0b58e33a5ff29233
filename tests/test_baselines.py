"""Inference-time baselines: Ms-PoE and Attention Buckets (pear.baselines).

Exactness tests use the harness's own decoding pattern (left padding, position ids from the
mask, a cache passed back opaquely), so prefill and cached decoding are both covered.
"""

import contextlib

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from pear.baselines import VARIANTS, get_variant
from pear.baselines.attention_buckets import combine_runs
from pear.baselines.ms_poe import _ratios_by_rank
from pear.errors import PearError


def tiny(model_type: str, layers: int = 4, seed: int = 0, **over):
    """A tiny model with enough layers for Ms-PoE (it leaves layers 0 and 1 alone)."""
    kw = dict(CONFIGS[model_type], num_hidden_layers=layers, **over)
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


TINY = {
    "llama": dict(),  # GQA: 4 heads, 2 KV heads
    "qwen2": dict(),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8),  # 2 RoPE bases
    "phi": dict(),  # partial rotary
}


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding of different lengths
    mask[1, :2] = 0
    return ids, mask


@torch.no_grad()
def decode(lm, ids, mask, steps: int = 4) -> torch.Tensor:
    """Last-position logits of the prefill and of `steps` greedy cached steps: (B, steps+1, V)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = lm(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                 use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


@contextlib.contextmanager
def rope_divided(model, r: float):
    """The model with linear RoPE scaling by r (inverse frequencies / r): reference for a uniform Ms-PoE ratio."""
    rot = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    bufs = [b for n, b in rot.named_buffers() if n.endswith("inv_freq") and "original" not in n]
    saved = [b.clone() for b in bufs]
    for b in bufs:
        b.div_(r)
    try:
        yield model
    finally:
        for b, s in zip(bufs, saved):
            b.copy_(s)


def test_registry_has_both_baselines():
    get_variant("none")
    assert {"ms-poe", "attention-buckets"} <= set(VARIANTS)
    assert get_variant("ms-poe").needs_rope and get_variant("attention-buckets").needs_rope


# ---------------------------------------------------------------------------- Ms-PoE
@pytest.mark.parametrize("model_type", list(TINY))
def test_ms_poe_ratio_one_is_exactly_the_base_model(model_type):
    model = tiny(model_type, **TINY[model_type])
    ids, mask = batch()
    base = decode(model, ids, mask)
    impl = model.config._attn_implementation
    with get_variant("ms-poe").wrap(model, min_ratio=1.0, max_ratio=1.0) as lm:
        got = decode(lm, ids, mask)
        assert model.config._attn_implementation != impl  # really running through our attention function
        assert sorted(lm.last_session.scores) == [2, 3]  # scores measured on layers 2.. only
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(decode(model, ids, mask), base, rtol=0, atol=0)  # restored


@pytest.mark.parametrize("model_type", list(TINY) + ["gpt_neox", "gemma2"])
def test_ms_poe_uniform_ratio_is_linear_rope_scaling(model_type):
    """All heads of all layers at ratio r must equal RoPE at positions p / r: checks the composed
    rotations, per-row positions under left padding, cached decoding, GQA, sliding windows."""
    over = dict(TINY.get(model_type, {}), **({"sliding_window": 8} if model_type == "gemma2" else {}))
    model = tiny(model_type, **over)
    ids, mask = batch()
    with rope_divided(model, 1.5):
        ref = decode(model, ids, mask)
    with get_variant("ms-poe").wrap(model, min_ratio=1.5, max_ratio=1.5, layers=range(4)) as lm:
        got = decode(lm, ids, mask)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert (decode(model, ids, mask) - ref).abs().max() > 1e-3  # the reference really differs from the base


def test_ms_poe_default_ratios_change_logits_and_follow_the_table():
    model = tiny("llama", layers=5)
    ids, mask = batch()
    base = decode(model, ids, mask)
    with get_variant("ms-poe").wrap(model) as lm:
        got = decode(lm, ids, mask)
        ratios = lm.last_session.ratios
    assert (got - base).abs().max() > 1e-3
    assert sorted(ratios) == [2, 3, 4]
    table = torch.tensor([1.2 + 0.6 * i / 4 for i in range(4)])
    for r in ratios.values():  # (B, H): each row a permutation of the table
        torch.testing.assert_close(r.sort(-1).values, table.expand_as(r))


def test_ms_poe_ranks_position_aware_heads_first():
    scores = torch.tensor([[0.10, 0.50, 0.30, 0.30]])
    r = _ratios_by_rank(scores, 1.2, 1.8)
    # head 1 (most outliers) -> 1.2; heads 2, 3 tie -> stable order; head 0 -> largest
    torch.testing.assert_close(r, torch.tensor([[1.65, 1.2, 1.35, 1.5]]))


def test_ms_poe_refuses_a_cache_it_did_not_fill():
    model = tiny("llama")
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    with get_variant("ms-poe").wrap(model) as lm, pytest.raises(PearError, match="cache"):
        lm(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)


# ---------------------------------------------------------------------------- Attention Buckets
@pytest.mark.parametrize("model_type", list(TINY))
def test_buckets_single_bucket_at_model_base_is_exactly_the_base_model(model_type):
    model = tiny(model_type, **TINY[model_type])
    ids, mask = batch()
    base = decode(model, ids, mask).log_softmax(-1)  # buckets return log of the combined distribution
    with get_variant("attention-buckets").wrap(model, bases=[10000]) as lm:  # 10000 scales to the model's base
        got = decode(lm, ids, mask)
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert not model.model.rotary_emb._forward_hooks  # hook removed


def test_buckets_one_other_base_equals_a_model_built_with_that_base():
    model = tiny("llama")
    ref_model = tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 23000.0})
    ref_model.load_state_dict(model.state_dict())
    ids, mask = batch()
    ref = decode(ref_model, ids, mask).log_softmax(-1)
    with get_variant("attention-buckets").wrap(model, bases=[23000], scale_to_model=False) as lm:
        got = decode(lm, ids, mask)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_buckets_combine_runs_by_confidence():
    """N buckets in one batch = N separate single-bucket runs, combined by confidence."""
    model = tiny("qwen2")
    ids, mask = batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    raw = []
    for b in (10000, 25000):  # combine="logits" with one run returns that run's raw logits
        with get_variant("attention-buckets").wrap(model, bases=[b], combine="logits") as lm:
            raw.append(lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    with get_variant("attention-buckets").wrap(model, bases=[10000, 25000]) as lm:
        both = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (raw[0] - raw[1]).abs().max() > 1e-4
    torch.testing.assert_close(both, combine_runs(torch.stack(raw)), rtol=0, atol=1e-5)


def test_combine_runs_formula():
    z = torch.tensor([[[[2.0, 0.0, 0.0]]], [[[0.0, 4.0, 0.0]]]])  # (N=2, B=1, T=1, V=3)
    alpha = torch.softmax(torch.tensor([2.0, 4.0]), 0)
    p = alpha[0] * torch.softmax(z[0, 0, 0], -1) + alpha[1] * torch.softmax(z[1, 0, 0], -1)
    torch.testing.assert_close(combine_runs(z)[0, 0], p.log())
    torch.testing.assert_close(combine_runs(z, "logits")[0, 0], alpha[0] * z[0, 0, 0] + alpha[1] * z[1, 0, 0])


def test_buckets_default_bases_scale_to_the_model_base():
    model = tiny("gemma3_text", **TINY["gemma3_text"])
    with get_variant("attention-buckets").wrap(model) as lm:
        bases = lm.bases
        ids, mask = batch()
        out = decode(lm, ids, mask, steps=2)
    assert bases["sliding_attention"] == [10000.0, 17500.0, 18000.0, 19000.0, 20000.0, 25000.0]
    assert bases["full_attention"] == [1e6, 1.75e6, 1.8e6, 1.9e6, 2e6, 2.5e6]
    assert out.shape == (3, 3, VOCAB) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- not applicable
@pytest.mark.parametrize("model_type,why", [("gpt2", "learned"), ("opt", "learned"), ("bloom", "ALiBi"),
                                            ("mpt", "ALiBi")])
@pytest.mark.parametrize("variant", ["ms-poe", "attention-buckets"])
def test_not_rope_is_not_applicable(model_type, why, variant):
    with pytest.raises(PearError, match=f"{variant} is not applicable to {model_type} models: .*{why}.*PEAR"):
        with get_variant(variant).wrap(tiny_model(model_type)):
            pass


def test_unsupported_rope_families_say_so():
    with pytest.raises(PearError, match="not supported for gptj"):
        with get_variant("ms-poe").wrap(tiny_model("gptj")):
            pass
    with pytest.raises(PearError, match="not supported for falcon"):  # attention not through AttentionInterface
        with get_variant("ms-poe").wrap(tiny_model("falcon")):
            pass


# ---------------------------------------------------------------------------- real model
@pytest.mark.real
def test_real_model_bf16(smollm2_bf16):
    tok = smollm2_bf16.tokenizer
    enc = tok(["The capital of France is", "Once upon a time, in a land far away,"], return_tensors="pt",
              padding=True, padding_side="left")
    base = decode(smollm2_bf16.model, enc.input_ids, enc.attention_mask, steps=2)
    with get_variant("ms-poe").wrap(smollm2_bf16, min_ratio=1.0, max_ratio=1.0) as lm:
        torch.testing.assert_close(decode(lm, enc.input_ids, enc.attention_mask, steps=2), base, rtol=0, atol=0)
    with get_variant("ms-poe").wrap(smollm2_bf16) as lm:
        mp = decode(lm, enc.input_ids, enc.attention_mask, steps=2)
    with get_variant("attention-buckets").wrap(smollm2_bf16, bases=[10000]) as lm:
        one = decode(lm, enc.input_ids, enc.attention_mask, steps=2)
    torch.testing.assert_close(one, base.log_softmax(-1), rtol=0, atol=0)
    assert torch.isfinite(mp).all() and (mp - base).abs().max() > 0.1


def test_variant_options_from_the_command_line(tmp_path):
    """--variant-option KEY=VALUE reaches the variant typed; a wrong name fails in one line."""
    import argparse

    from pear.commands.eval import add_cli, parse_option

    assert parse_option("min_ratio=1.2") == ("min_ratio", 1.2)
    assert parse_option("bases=10000,17500") == ("bases", [10000, 17500])
    assert parse_option("combine=logits") == ("combine", "logits")
    with pytest.raises(PearError, match="KEY=VALUE"):
        parse_option("oops")
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    ns = ap.parse_args(["eval", "--model", "a", "--variant", "ms-poe", "--variant-option", "min_ratio=1.0",
                        "--variant-option", "max_ratio=1.0", "--model", "b", "--task", "kv"])
    assert ns.models[0]["options"] == {"min_ratio": 1.0, "max_ratio": 1.0} and ns.models[1]["options"] == {}
    from pear.baselines import get_variant

    assert get_variant("ms-poe").options == ["min_ratio", "max_ratio", "layers"]
    with pytest.raises(PearError, match="has no option ratio .*min_ratio, max_ratio, layers"):
        get_variant("ms-poe").check_options({"ratio": 2})
