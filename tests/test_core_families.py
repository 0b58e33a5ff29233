"""Core on every family: hooks == fold, save/reload, zero overhead by construction."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pear
from pear.folding import fold_and_save
from pear.families import FAMILIES
from pear.loading import LoadedModel, ModelSpec
from pear.errors import PearError
from pear.folding import HeadScaling, fold, unfold
from tiny_models import CONFIGS, VOCAB, tiny_model

COEFS = {(0, 1): 0.25, (1, 0): -0.5, (1, 3): 1.7}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_every_family_in_the_table_has_a_tiny_model():
    assert set(CONFIGS) == set(FAMILIES)
    assert len(FAMILIES) >= 16


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_hooked_equals_folded_and_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    arch = pear.resolve(model)
    assert arch.n_heads * arch.head_dim == (arch.out_projs[0].weight.shape[0 if arch.family.weight_in_rows else 1])
    base = _logits(model)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    n_params = sum(p.numel() for p in model.parameters())
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]

    with HeadScaling(model, COEFS, trainable=False):
        hooked = _logits(model)
    assert not torch.allclose(hooked, base, atol=1e-4), "scaling heads must change the logits"
    assert torch.equal(_logits(model), base), "leaving the context must remove the hooks"
    assert all(len(m._forward_pre_hooks) == 0 for m in arch.out_projs)

    loaded = LoadedModel(model, None, ModelSpec(f"tiny-{model_type}", "folder", str(tmp_path)))
    out, v = fold_and_save(loaded, COEFS, tmp_path / "out")
    folded = _logits(model)
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)
    assert v.max_abs_diff < 1e-4
    for n, p in model.named_parameters():  # bias untouched
        if n in biases:
            assert torch.equal(p, biases[n]), n

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-5, rtol=1e-5)
    # zero overhead by construction: same parameters, same modules
    assert sum(p.numel() for p in reloaded.parameters()) == n_params
    assert [(n, type(m).__name__) for n, m in reloaded.named_modules()] == modules
    meta = json.loads((out / "pear.json").read_text())
    assert {(h["layer"], h["head"]): h["coefficient"] for h in meta["heads"]} == COEFS
    assert meta["model_type"] == model_type


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_head_scaling_trains_only_alpha_and_unfold_restores(model_type):
    model = tiny_model(model_type)
    for p in model.parameters():
        p.requires_grad_(False)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with HeadScaling(model, list(COEFS)) as hs:
        assert torch.equal(hs.alpha.detach(), torch.ones(3))
        model(IDS).logits.float().pow(2).mean().backward()
    assert hs.alpha.grad is not None and hs.alpha.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    fold(model, COEFS)
    unfold(model, COEFS)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=1e-6)


def test_only_the_selected_head_slice_is_scaled():
    model = tiny_model("gpt2")  # Conv1D: weight [in, out], heads are row blocks
    arch = pear.resolve(model)
    w0 = arch.out_projs[1].weight.detach().clone()
    fold(model, {(1, 2): 0.5})
    w1 = arch.out_projs[1].weight.detach()
    D = arch.head_dim
    torch.testing.assert_close(w1[2 * D:3 * D], w0[2 * D:3 * D] * 0.5)
    assert torch.equal(w1[:2 * D], w0[:2 * D]) and torch.equal(w1[3 * D:], w0[3 * D:])
    # GPT-2 also has mlp.c_proj (Conv1D): it must not be the module we picked
    assert arch.out_proj_path(1) == "transformer.h.1.attn.c_proj"


def test_gemma_head_dim_from_config():
    model = tiny_model("gemma3_text")
    arch = pear.resolve(model)
    assert arch.head_dim == 24 and arch.n_heads * arch.head_dim != model.config.hidden_size
    assert arch.n_kv_heads == 2 and arch.n_heads == 4


def test_hook_scales_in_low_precision():
    model = tiny_model("llama", dtype=torch.bfloat16)
    with HeadScaling(model, COEFS, trainable=False):
        hooked = _logits(model)
    fold(model, COEFS)
    assert (hooked.float() - _logits(model).float()).abs().max() < 0.1


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_16bit_fold_is_checked_in_fp32_and_dtypes_kept(model_type, monkeypatch):
    """A bf16 model's fold check runs in fp32 (16-bit activations' own rounding over many
    scaled heads would swamp the check), with the folded weights rounded to bf16 as saved:
    the difference is that one rounding. Afterwards every parameter and buffer has its own
    dtype again (the fp32 RoPE tables are not rounded to bf16); a wrong fold is caught."""
    from pear.folding import FP32_CHECK_TOLERANCE, verify_fold
    from pear.folding.checkpoint import verification_input

    model = tiny_model(model_type, dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    coefs = {(l, h): 1.0 + 0.15 * ((l + h) % 3 - 1) for l in range(2) for h in range(4)}  # every head
    v = verify_fold(model, coefs)
    assert v.compute_dtype == "float32" and v.as_dict()["compute_dtype"] == "float32"
    assert v.max_abs_diff <= FP32_CHECK_TOLERANCE[torch.bfloat16] * v.logits_max_abs
    assert {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]} == dtypes
    # the folded bf16 weights, in fp32 arithmetic, against the hooked bf16 base in fp32: the same check by hand
    ids = verification_input(model)
    folded = model.float()(ids).logits
    unfold(model, coefs)
    with HeadScaling(model, coefs, trainable=False):
        hooked = model(ids).logits
    assert (folded - hooked).abs().max() <= v.tolerance
    import pear.folding.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "fold", lambda m, c, site: fold(m, {k: -a for k, a in c.items()}, site))  # a wrong fold
    model = tiny_model(model_type, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    some = {k: a for k, a in coefs.items() if k[1] != 2}  # the unscaled heads' slices are not kept, nor touched
    with pytest.raises(pear.PearError, match="fold verification failed.*with fp32 weights, not rounded, the logits"):
        verify_fold(model, some)  # not a rounding: fp32 would not help
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in model.named_parameters())


def test_a_fold_that_rounding_breaks_says_to_save_in_fp32():
    """Query-side scales on large query biases (Qwen2.5's reach 81): rounding the scaled rows to bf16
    can move the logits past the check's tolerance. The check then refuses, leaves the model as it
    was and names the cause and the way out, which passes the same check here: fp32 weights."""
    from pear.folding import verify_fold

    model = tiny_model("qwen2", dtype=torch.bfloat16)
    arch = pear.resolve(model)
    with torch.no_grad():
        for q in arch.q_projs:
            q.bias[::7] = 200.0  # a few large query-bias channels, as in Qwen2.5's first layer
    D = arch.head_dim
    coefs = {(l, h): [1.0 + 0.003 * ((7 * i + h) % 11 - 5) for i in range(D)]
             for l in range(arch.n_layers) for h in range(arch.n_heads)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PearError, match=r"the scaled weights' rounding to bfloat16 \(fp32 weights avoid it: pear run --save-dtype fp32, pear fold"):
        verify_fold(model, coefs, tolerance=1e-4, site="query")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert verify_fold(model.float(), coefs, tolerance=1e-4, site="query").ok


QUERY_FAMILIES = sorted(mt for mt in CONFIGS if FAMILIES[mt].qk_proj is not None and FAMILIES[mt].q_norm is None)


@pytest.mark.parametrize("model_type", QUERY_FAMILIES)
def test_query_side_scales_fold_exactly_into_the_query_projection(model_type, tmp_path):
    """Scales on the heads' queries (site "query": per head, or per channel) fold into the query
    projection's rows and bias: folded logits = hooked logits, only the scaled heads' query rows change
    (the output projection is untouched), the saved folder reloads to the same logits and says its site."""
    model = tiny_model(model_type)
    arch = pear.resolve(model)
    D = arch.head_dim
    coefs = {(0, 1): 0.25, (1, 0): [0.5 + 0.05 * i for i in range(D)], (1, 3): 1.7}
    base = _logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with HeadScaling(model, coefs, trainable=False, site="query"):
        hooked = _logits(model)
    assert not torch.allclose(hooked, base, atol=1e-5), "scaling queries must change the logits"
    assert torch.equal(_logits(model), base) and all(len(q._forward_hooks) == 0 for q in arch.q_projs)

    loaded = LoadedModel(model, None, ModelSpec(f"tiny-{model_type}", "folder", str(tmp_path)))
    out, v = fold_and_save(loaded, coefs, tmp_path / "out", site="query")
    torch.testing.assert_close(_logits(model), hooked, atol=1e-5, rtol=1e-5)
    q_path = f"{FAMILIES[model_type].blocks}.1.{FAMILIES[model_type].qk_proj[0]}"
    for n, p in model.named_parameters():
        if n.startswith(q_path):  # head 0 and head 3 of layer 1 scaled, the other heads' rows as they were
            rows = p.detach().view(arch.n_heads, D, -1) if p.dim() == 2 else p.detach().view(arch.n_heads, D, 1)
            old = before[n].view_as(rows)
            torch.testing.assert_close(rows[3], old[3] * 1.7)
            assert torch.equal(rows[1], old[1]) and torch.equal(rows[2], old[2])
        elif not any(n.startswith(f"{FAMILIES[model_type].blocks}.{l}.{FAMILIES[model_type].qk_proj[0]}")
                     for l in (0, 1)):
            assert torch.equal(p, before[n]), n  # the output projections and everything else untouched
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-5, rtol=1e-5)
    meta = json.loads((out / "pear.json").read_text())
    assert meta["site"] == "query" and "have their queries" in (out / "README.md").read_text()
    unfold(model, coefs, site="query")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)


def test_query_side_scales_train_only_alpha_and_need_a_separate_query_projection():
    model = tiny_model("qwen2")  # a query bias: scaled with its rows
    for p in model.parameters():
        p.requires_grad_(False)
    with HeadScaling(model, list(COEFS), channels=True, site="query") as hs:
        model(IDS).logits.float().pow(2).mean().backward()
    assert hs.alpha.shape == (3, pear.resolve(model).head_dim) and hs.alpha.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    for mt in ("gpt2", "phi3"):  # fused query-key-value projections
        with pytest.raises(PearError, match="separate query projection"):
            HeadScaling(tiny_model(mt), COEFS, site="query")


@pytest.mark.parametrize("model_type,says", [("llama", "yes"), ("gemma3_text", "no: query-side scales cannot act"),
                                              ("gpt2", "no: query-side scales need a separate query projection")])
def test_inspect_says_whether_query_side_scales_can_act(model_type, says):
    from pear.inspect import describe
    info = describe(LoadedModel(tiny_model(model_type), None, ModelSpec(f"tiny-{model_type}", "folder", ".")))
    assert info["query_side_scales"].startswith(says)


@pytest.mark.parametrize("model_type", sorted(mt for mt in CONFIGS if FAMILIES[mt].q_norm))
def test_query_side_scales_are_refused_where_a_query_norm_would_cancel_them(model_type):
    """Gemma 3 and Qwen 3 normalise each head's query after the projection with a norm shared by the
    heads: a per-head query scale changes nothing (measured here), and no per-head weight is left
    to fold it into, so hooks and fold refuse in one line."""
    model = tiny_model(model_type)
    base = _logits(model)
    arch = pear.resolve(model)
    q = arch.q_projs[1]
    handle = q.register_forward_hook(lambda m, a, out: out * 3.0)  # every head's query x3, before the norm
    try:
        torch.testing.assert_close(_logits(model), base, atol=1e-3, rtol=1e-3)
    finally:
        handle.remove()
    with pytest.raises(PearError, match="query norm, shared by the heads"):
        HeadScaling(model, COEFS, site="query")
    with pytest.raises(PearError, match="query norm, shared by the heads"):
        fold(model, COEFS, site="query")
    assert torch.equal(_logits(model), base)
    with pytest.raises(PearError, match="unknown coefficient site"):
        fold(tiny_model("llama"), COEFS, site="keys")
