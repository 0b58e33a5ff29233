"""Output formats: channel scales, the PEFT IA3 adapter, GGUF tensors, the model card, --format."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pear
from pear.cli import main
from pear.errors import PearError
from pear.export import gguf_file
from pear.export.scales import ChannelScaling, channel_scales, check_channel_scales, scales_json
from pear.families import resolve
from pear.folding import HeadScaling, fold
from pear.folding.coefficients import coefficients_json, summary_value
from tiny_models import tiny_gguf, tiny_model

COEFS = {(0, 1): 0.5, (1, 3): -0.7, (1, 0): 1.3}


def _channel_coefs(head_dim, seed=3):
    """COEFS made per-channel (as `--scales channels` fits them): each head's coefficient times
    head_dim factors in [0.5, 1.5), so the scales vary inside every head (and quantisation block)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (a * (0.5 + torch.rand(head_dim, generator=g))).tolist() for k, a in COEFS.items()}


def _coef_file(tmp_path, coefs=COEFS):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"heads": [{"layer": l, "head": h, "coefficient": a} for (l, h), a in coefs.items()]}))
    return f


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- channel scales
@pytest.mark.parametrize("mt", ["llama", "gemma", "gpt2"])
def test_channel_scales_repeat_each_head_coefficient_and_match_head_scaling(mt):
    model = tiny_model(mt)
    arch = resolve(model)
    sc = channel_scales(arch, COEFS)
    assert sorted(sc) == [0, 1] and all(v.shape == (arch.n_heads * arch.head_dim,) for v in sc.values())
    d = arch.head_dim
    assert torch.all(sc[0][d:2 * d] == 0.5) and torch.all(sc[0][:d] == 1) and torch.all(sc[0][2 * d:] == 1)
    assert torch.equal(sc[1][3 * d:4 * d], torch.full((d,), -0.7)) and torch.equal(sc[1][:d], torch.full((d,), 1.3))
    ids = _ids(128)
    with torch.no_grad():
        base = model(ids).logits
        with HeadScaling(model, COEFS, trainable=False):
            heads = model(ids).logits
        with ChannelScaling(model, sc):
            chans = model(ids).logits
    torch.testing.assert_close(chans, heads, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(chans, base, atol=1e-3)  # the scales do something


@pytest.mark.parametrize("mt", ["llama", "gemma", "gpt2"])
def test_channel_scales_carry_per_channel_coefficients_channel_for_channel(mt):
    model = tiny_model(mt)
    arch = resolve(model)
    D = arch.head_dim
    coefs = _channel_coefs(D)
    sc = channel_scales(arch, coefs)
    assert sorted(sc) == [0, 1]
    for (l, h), a in coefs.items():
        assert torch.equal(sc[l][h * D:(h + 1) * D], torch.tensor(a, dtype=torch.float32)), (l, h)
    assert torch.all(sc[0][:D] == 1) and torch.all(sc[1][D:3 * D] == 1)  # unselected heads
    rec = scales_json(sc, arch)["layers"]  # pear.json / pear.channel_scales keep every channel
    assert [r["layer"] for r in rec] == [0, 1] and all("channels" in r for r in rec)
    assert rec[1]["channels"][3 * D:4 * D] == pytest.approx(coefs[(1, 3)], rel=1e-6)
    ids = _ids(128)
    with torch.no_grad():
        with HeadScaling(model, coefs, trainable=False):
            heads = model(ids).logits
        with ChannelScaling(model, sc):
            chans = model(ids).logits
        with HeadScaling(model, {k: summary_value(a) for k, a in coefs.items()}, trainable=False):
            means = model(ids).logits
    torch.testing.assert_close(chans, heads, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(chans, means, atol=1e-3)  # each channel counts, not only the head's mean


def test_channel_scales_bad_input_is_one_clear_error():
    arch = resolve(tiny_model("llama"))
    n = arch.n_heads * arch.head_dim
    for scales, needle in [({0: torch.ones(n - 1)}, "expected heads x head_dim"),
                           ({5: torch.ones(n)}, "layer 5 out of range"),
                           ({0: torch.full((n,), float("nan"))}, "not all finite"), ({}, "nothing to export")]:
        with pytest.raises(PearError, match=needle):
            check_channel_scales(arch, scales)


# ---------------------------------------------------------------------------- PEFT
@pytest.fixture
def tiny_folder(tmp_path):
    def make(mt="llama", dtype=torch.float32):
        d = tmp_path / f"tiny-{mt}-{str(dtype)[6:]}"
        tiny_model(mt, dtype=dtype).save_pretrained(d)
        return d
    return make


def _adapter_and_fold(base_dir, adapter, hf):
    """The base, the adapter on the base and the folded HF folder: logits on one input (base,
    adapter, folded), and the state dicts of merge_and_unload() and of the folded folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    folded = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = _ids(128, 1)
    with torch.no_grad():
        logits = [m(input_ids=ids).logits.float() for m in
                  (base, PeftModel.from_pretrained(copy.deepcopy(base), adapter), folded)]
    merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload().state_dict()
    return logits, merged, folded.state_dict(), base.state_dict()


@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("mt,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("gemma", torch.float32),
                                      ("llama", torch.bfloat16)])
def test_peft_adapter_equals_fold_and_merge_equals_pear_fold(tmp_path, tiny_folder, mt, dtype, granularity, capsys):
    from safetensors.torch import load_file

    base_dir = tiny_folder(mt, dtype)
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    D = resolve(tiny_model(mt)).head_dim
    given = COEFS if granularity == "head" else _channel_coefs(D)
    coefs = _coef_file(tmp_path, given)
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(coefs), "--out", str(tmp_path / "ad"),
                 "--format", "peft"]) == 0
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(coefs), "--out", str(tmp_path / "hf")]) == 0
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before, "the input model must not change"
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["target_modules"] == cfg["feedforward_modules"]
    assert "base_model_relation: adapter" not in (tmp_path / "ad" / "README.md").read_text()  # a path: no hub id
    ia3 = {k: v for k, v in load_file(tmp_path / "ad" / "adapter_model.safetensors").items() if "ia3_l" in k}
    assert len(ia3) == 2  # one vector per layer with scales: the channel-scale vectors, channel for channel
    for layer, v in channel_scales(resolve(tiny_model(mt)), given).items():
        (stored,) = [t for k, t in ia3.items() if f".{layer}." in k]
        assert torch.equal(stored.reshape(-1), v), layer
    if granularity == "channel":
        layers = json.loads((tmp_path / "ad" / "pear.json").read_text())["channel_scales"]["layers"]
        assert all("channels" in r for r in layers)
    (off, got, ref), merged, want, _ = _adapter_and_fold(base_dir, tmp_path / "ad", tmp_path / "hf")
    tol = 1e-5 if dtype == torch.float32 else 3e-2 * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= tol
    assert float((off - ref).abs().max()) > 3 * tol  # the adapter does something
    assert set(merged) == set(want)
    for k in want:  # merge_and_unload() is `pear fold`, weight for weight
        assert merged[k].dtype == want[k].dtype and torch.equal(merged[k], want[k]), k


@pytest.mark.parametrize("granularity", ["head", "channel"])
@pytest.mark.parametrize("mt", ["llama", "qwen2"])  # qwen2: a query bias, scaled with its rows
def test_query_side_peft_adapter_equals_query_fold(tmp_path, tiny_folder, mt, granularity, capsys):
    """Query-side scales as an IA3 adapter: IA3 on the query projection (not feed-forward) scales its
    output, bias included, so the adapter's logits are the query-folded model's, and
    merge_and_unload() writes the same weights as `pear fold` (rows and bias of the query projection)."""
    base_dir = tiny_folder(mt)
    D = resolve(tiny_model(mt)).head_dim
    given = COEFS if granularity == "head" else _channel_coefs(D)
    f = tmp_path / "q.json"
    f.write_text(json.dumps({**json.loads(_coef_file(tmp_path, given).read_text()), "site": "query"}))
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(f), "--out", str(tmp_path / "ad"),
                 "--format", "peft"]) == 0
    assert "their queries" in capsys.readouterr().out
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(f), "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert not cfg["feedforward_modules"]
    assert json.loads((tmp_path / "ad" / "pear.json").read_text())["site"] == "query"
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "have their queries" in card and "one scale per output channel of the query projection" in card
    (off, got, ref), merged, want, base = _adapter_and_fold(base_dir, tmp_path / "ad", tmp_path / "hf")
    assert float((got - ref).abs().max()) <= 1e-5 < float((off - ref).abs().max())
    for k in want:  # only the query projections differ from the base, and as `pear fold` wrote them
        torch.testing.assert_close(merged[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    assert {k for k in want if not torch.equal(want[k], base[k])} <= {k for k in want if "q_proj" in k}


def test_fold_on_some_layers_only(tmp_path, tiny_folder, capsys):
    """`pear fold --layers 1` folds layer 1's coefficients alone: the same weights as folding a file
    of those coefficients only, layer 0 left as the base has it; a layer set with no coefficient is
    refused in one line, nothing written."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_folder()
    full = _coef_file(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(full), "--layers", "1",
                 "--out", str(tmp_path / "l1")]) == 0
    assert main(["fold", "--model", str(base_dir), "--coefficients",
                 str(_coef_file(sub, {k: a for k, a in COEFS.items() if k[0] == 1})), "--out", str(tmp_path / "ref")]) == 0
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "l1").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    o0, o1 = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(got[o0], base[o0]) and not torch.equal(got[o1], base[o1])
    capsys.readouterr()
    assert main(["fold", "--model", str(base_dir), "--coefficients", str(full), "--layers", "5-6",
                 "--out", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no coefficient on layers 5-6" in err[0] and not (tmp_path / "none").exists()


@pytest.mark.parametrize("granularity", ["head", "channel"])
def test_fold_with_a_strength(tmp_path, tiny_folder, granularity):
    """`pear fold --strength C` folds 1 + C (a - 1): the weights of a file written that way; C = 0
    is the base model's weights, C = 1 the coefficients as they are."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_folder()
    given = COEFS if granularity == "head" else _channel_coefs(resolve(tiny_model("llama")).head_dim)
    stronger = {k: [1 + 2.5 * (x - 1) for x in a] if isinstance(a, list) else 1 + 2.5 * (a - 1) for k, a in given.items()}
    (tmp_path / "s").mkdir()
    runs = {"x2.5": (_coef_file(tmp_path, given), ["--strength", "2.5"]), "ref": (_coef_file(tmp_path / "s", stronger), []),
            "x0": (tmp_path / "c.json", ["--strength", "0"]), "x1": (tmp_path / "c.json", ["--strength", "1"]),
            "plain": (tmp_path / "c.json", [])}
    for name, (f, extra) in runs.items():
        assert main(["fold", "--model", str(base_dir), "--coefficients", str(f), *extra, "--out", str(tmp_path / name)]) == 0
    sd = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in runs}
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    for k in base:
        torch.testing.assert_close(sd["x2.5"][k], sd["ref"][k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sd["x0"][k], base[k], rtol=0, atol=0)
        assert torch.equal(sd["x1"][k], sd["plain"][k])
    o1 = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(sd["x2.5"][o1], sd["plain"][o1])


def test_peft_adapter_card_names_the_hub_base(tmp_path, monkeypatch, tiny_folder):
    from pear.folding import checkpoint

    d = tiny_folder()
    monkeypatch.setitem(checkpoint.HUB_IDS, str(d), "owner/tiny-llama")
    assert main(["fold", "--model", str(d), "--coefficients", str(_coef_file(tmp_path)), "--out", str(tmp_path / "a"),
                 "--format", "peft"]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: owner/tiny-llama\nbase_model_relation: adapter\nlibrary_name: peft" in card
    assert "| 1 | 3 | -0.7000 |" in card and "PeftModel.from_pretrained" in card
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "owner/tiny-llama"


# ---------------------------------------------------------------------------- GGUF tensors
def _quantised(qtype_name, out=8, n_in=128, seed=0):
    from gguf import GGMLQuantizationType, quants

    q = GGMLQuantizationType[qtype_name]
    w = np.random.default_rng(seed).normal(size=(out, n_in)).astype(np.float32)
    return SimpleNamespace(name="blk.0.attn_output.weight", tensor_type=q, data=quants.quantize(w, q))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32"])
def test_gguf_tensor_keeps_type_and_untouched_blocks_and_scales_the_head(qtype):
    from gguf import quants

    t = _quantised(qtype)
    v = torch.ones(128)
    v[64:] = 0.5  # head 1 of 2 (head_dim 64)
    new, written, how = gguf_file.scale_tensor(t, v)
    assert written == t.tensor_type and how == "repacked" and new.shape == t.data.shape
    old_w, new_w = quants.dequantize(t.data, t.tensor_type), quants.dequantize(new, written)
    assert np.array_equal(new_w[:, :64], old_w[:, :64])  # head 0's blocks: the same bytes
    if new.dtype == np.uint8:
        assert np.array_equal(new[:, :new.shape[1] // 2], t.data[:, :t.data.shape[1] // 2])
    # a block scaled as a whole re-quantises to the same integers: only fp16 block scales round
    np.testing.assert_allclose(new_w[:, 64:], 0.5 * old_w[:, 64:], atol=2e-3 * np.abs(old_w).max())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0", "F16", "F32"])
def test_gguf_query_rows_scaled_per_channel_keep_type_and_integers(qtype):
    """Query-side scales scale a tensor's rows (axis "out"): each quantisation block lies in one row,
    so even one scale per row keeps the type, the bytes of unscaled rows, and the integers."""
    from gguf import quants

    t = _quantised(qtype, out=128, n_in=64)
    v = torch.ones(128)
    v[64:] = torch.linspace(0.3, 1.7, 64)  # head 1 of 2, one scale per channel (row)
    new, written, how = gguf_file.scale_tensor(t, v, "out")
    assert written == t.tensor_type and how == "repacked" and new.shape == t.data.shape
    old_w, new_w = quants.dequantize(t.data, t.tensor_type), quants.dequantize(new, written)
    assert np.array_equal(new[:64], t.data[:64])  # head 0's rows: the same bytes
    np.testing.assert_allclose(new_w[64:], v.numpy()[64:, None] * old_w[64:], atol=2e-3 * np.abs(old_w).max())
    bias = SimpleNamespace(name="blk.0.attn_q.bias", tensor_type=quants.GGMLQuantizationType.F32,
                           data=np.arange(128, dtype=np.float32))
    new_b, _, _ = gguf_file.scale_tensor(bias, v, "out")
    np.testing.assert_allclose(new_b, v.numpy() * np.arange(128), rtol=1e-6)
    with pytest.raises(PearError, match="does not match 100 rows"):
        gguf_file.scale_tensor(t, torch.ones(100), "out")


def test_gguf_tensor_with_per_channel_scales_is_requantised_to_q8_0_unless_blocks_are_scaled_whole():
    from gguf import GGMLQuantizationType as T, quants

    t = _quantised("Q4_1")
    old_w = quants.dequantize(t.data, T.Q4_1)
    v = torch.ones(128)
    v[64:] = torch.linspace(0.3, 1.7, 64)  # head 1 of 2, one scale per channel
    new, written, how = gguf_file.scale_tensor(t, v)
    assert (written, how) == (T.Q8_0, "Q8_0") and gguf_file.tolerance_for({"t": {"how": how}}) == 2e-2
    want = old_w * v.numpy()[None, :]
    err = np.abs(quants.dequantize(new, written) - want)
    assert err.max() <= np.abs(want).max() / 127  # within one Q8_0 step
    # re-quantising in Q4_1 would have rounded the varying block a second time, at 4 bits
    err_q4 = np.abs(quants.dequantize(quants.quantize(want, T.Q4_1), T.Q4_1) - want)
    assert err[:, 64:].max() < err_q4[:, 64:].max() / 4
    # scales constant over each 32-channel block (not over the head) keep the type and the integers
    v = torch.ones(128)
    v[64:96], v[96:] = 0.5, 0.8
    new, written, how = gguf_file.scale_tensor(t, v)
    assert (written, how) == (T.Q4_1, "repacked")
    assert np.array_equal(new[:, :new.shape[1] // 2], t.data[:, :t.data.shape[1] // 2])
    np.testing.assert_allclose(quants.dequantize(new, written), old_w * v.numpy()[None, :],
                               atol=2e-3 * np.abs(old_w).max())


def test_gguf_tensor_in_a_type_gguf_cannot_quantise_falls_back_to_q8_0(monkeypatch):
    from gguf import GGMLQuantizationType as T, quants

    monkeypatch.setattr(gguf_file, "REQUANTISABLE", {"Q8_0"})  # as if Q4_1 were a K-quant
    t = _quantised("Q4_1")
    new, written, how = gguf_file.scale_tensor(t, torch.full((128,), 0.5))
    assert (written, how) == (T.Q8_0, "Q8_0")
    np.testing.assert_allclose(quants.dequantize(new, written), 0.5 * quants.dequantize(t.data, T.Q4_1), atol=0.02)
    assert gguf_file._target_type(T.Q4_K, 48) == (T.F16, "F16")  # rows not a multiple of 32
    with pytest.raises(PearError, match="does not match 64 input channels"):
        gguf_file.scale_tensor(t, torch.ones(64))


def test_format_gguf_needs_a_gguf_base_and_writes_nothing(tmp_path, tiny_folder, capsys):
    out = tmp_path / "g"
    assert main(["fold", "--model", str(tiny_folder()), "--coefficients", str(_coef_file(tmp_path)), "--out", str(out),
                 "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a GGUF base model" in err and "convert_hf_to_gguf" in err
    assert not out.exists()
    with pytest.raises(PearError, match="needs a GGUF base model"):  # pear run refuses before any work
        pear.run(str(tiny_folder()), tmp_path / "r", format="gguf", progress=False)
    assert not (tmp_path / "r").exists()


def test_run_format_peft_writes_adapter_with_effect_in_card(tmp_path, tiny_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = tiny_folder()
    res = pear.run(str(d), tmp_path / "run", k=2, method="fast", discovery_settings="6x8", top_m=8, steps=3, batch=4,
                   length=16, eval_batch=4, lr=0.1, progress=False, format="peft")
    m = res.model_dir
    assert (m / "adapter_model.safetensors").is_file() and not (m / "model.safetensors").exists()
    card = (m / "README.md").read_text()
    sf = res.saved["folded"]
    assert "## Measured effect" in card and f"{sf['proxy_loss']:.4f}" in card and "`pear run`" in card
    assert "IA3 adapter" in res.report_path.read_text() and res.command.endswith("--format peft")
    base = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = _ids(128, 2)
    with torch.no_grad():
        want = fold(copy.deepcopy(base), res.coefficients)(ids).logits
        got = PeftModel.from_pretrained(base, m)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- GGUF, real model
@pytest.mark.real
def test_gguf_real_default_model_only_attention_outputs_change(tmp_path, smollm2, monkeypatch):
    import gguf

    from pear.export.formats import save_gguf
    from pear.export.scales import snapshot_site

    coefs = {(16, 0): 0.6, (24, 4): 0.5, (29, 0): 1.4}
    base_file = Path(smollm2.spec.path) / smollm2.spec.gguf_file
    restore = snapshot_site(smollm2.model)
    try:
        fold(smollm2.model, coefs)
        path, v = save_gguf(smollm2, coefs, tmp_path / "g")
        folded_w = {l: smollm2.model.model.layers[l].self_attn.o_proj.weight.detach().numpy().copy() for l in (16, 24)}
    finally:
        restore()
    assert v["max_abs_logit_diff"] <= v["tolerance"] and v["argmax_agreement"] == 1.0
    assert {s["written"] for s in v["stored"].values()} == {"Q4_1"}
    a, b = gguf.GGUFReader(str(base_file)), gguf.GGUFReader(str(path))
    changed = {f"blk.{l}.attn_output.weight" for l in (16, 24, 29)}
    tb = {t.name: t for t in b.tensors}
    assert [t.name for t in a.tensors] == list(tb)
    for t in a.tensors:
        same = t.tensor_type == tb[t.name].tensor_type and np.array_equal(t.data, tb[t.name].data)
        assert same != (t.name in changed), t.name
    for name, f in a.fields.items():  # every key kept, byte for byte
        if name != "GGUF.kv_count":
            assert all(np.array_equal(x, y) for x, y in zip(f.parts, b.fields[name].parts)), name
    assert b.fields["pear.base_sha256"].contents() == gguf_file.sha256(base_file)
    assert json.loads(b.fields["pear.coefficients"].contents())[1] == {"layer": 24, "head": 4, "coefficient": 0.5}
    # orientation: the stored tensor, dequantised, is the folded [out, in] weight (within Q4_1 block rounding)
    for l, w in folded_w.items():
        t = tb[f"blk.{l}.attn_output.weight"]
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.abs(got - w).max() <= 2e-3 * np.abs(w).max()
    meta = json.loads((tmp_path / "g" / "pear.json").read_text())
    assert meta["gguf"]["base_sha256"] == b.fields["pear.base_sha256"].contents()
    assert "Q4_1 -> Q4_1" in (tmp_path / "g" / "README.md").read_text()
    # the check can fail: a file whose weights are the base's is refused, and nothing is written
    unfolded = copy.deepcopy(smollm2.model)
    monkeypatch.setattr(gguf_file, "load_back", lambda p: unfolded)
    try:
        fold(smollm2.model, coefs)
        with pytest.raises(PearError, match="GGUF verification failed"):
            save_gguf(smollm2, coefs, tmp_path / "bad")
    finally:
        restore()
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def _fold_gguf_per_channel(tmp_path, model, layers, site="output"):
    """`pear fold --format gguf` of the default model with one scale in [0.6, 1.4) per channel on every
    head of `layers` at `site`: (the coefficients, the coefficients file, the written GGUF path)."""
    arch = resolve(model)
    g = torch.Generator().manual_seed(0)
    coefs = {(l, h): (0.6 + 0.8 * torch.rand(arch.head_dim, generator=g)).tolist()
             for l in layers for h in range(arch.n_heads)}
    c = tmp_path / "c.json"
    c.write_text(json.dumps(coefficients_json(coefs, site=site)))
    assert main(["fold", "--model", "smollm2-135m", "--coefficients", str(c), "--format", "gguf",
                 "--out", str(tmp_path / "g")]) == 0
    (path,) = (tmp_path / "g").glob("*.pear.gguf")
    return coefs, c, path


@pytest.mark.real
def test_gguf_real_default_model_per_channel_coefficients(tmp_path, smollm2, capsys):
    """`pear fold --format gguf` with one scale per channel (as `pear fit --scales channels` writes
    them) on every head of three layers: those tensors go to Q8_0, the rest stay byte for byte,
    and the file loaded back is the folded model within Q8_0's tolerance."""
    import gguf

    from pear.export.scales import snapshot_site

    arch = resolve(smollm2.model)
    D, layers = arch.head_dim, (16, 24, 29)
    coefs, _, path = _fold_gguf_per_channel(tmp_path, smollm2.model, layers)
    assert "(Q4_1->Q8_0)" in capsys.readouterr().out
    a, b = gguf.GGUFReader(str(Path(smollm2.spec.path) / smollm2.spec.gguf_file)), gguf.GGUFReader(str(path))
    changed = {f"blk.{l}.attn_output.weight" for l in layers}
    assert json.loads(b.fields["pear.attn_output_types"].contents()) == \
        {n: {"original": "Q4_1", "written": "Q8_0", "how": "Q8_0"} for n in sorted(changed)}
    rec = json.loads(b.fields["pear.channel_scales"].contents())["layers"]
    assert [r["layer"] for r in rec] == list(layers)
    assert rec[1]["channels"][4 * D:5 * D] == pytest.approx(coefs[(24, 4)], rel=1e-6)
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        if t.name not in changed:
            assert t.tensor_type == tb[t.name].tensor_type and np.array_equal(t.data, tb[t.name].data), t.name
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    restore = snapshot_site(smollm2.model)
    with torch.no_grad():
        base = smollm2.model(ids).logits
        try:
            fold(smollm2.model, coefs)
            ref = smollm2.model(ids).logits
            folded_w = {l: arch.out_projs[l].weight.detach().numpy().copy() for l in layers}
        finally:
            restore()
        got = gguf_file.load_back(path)(ids).logits
    err = float((got - ref).abs().max())
    assert err <= gguf_file.GGUF_TOLERANCE["Q8_0"] * max(1.0, float(ref.abs().max()))
    assert float((base - ref).abs().max()) > 3 * err  # the file carries the re-weighting
    for l, w in folded_w.items():  # orientation, channel for channel: within one Q8_0 step
        t = tb[f"blk.{l}.attn_output.weight"]
        assert np.abs(gguf.quants.dequantize(t.data, t.tensor_type) - w).max() <= np.abs(w).max() / 127


@pytest.mark.real
def test_gguf_real_default_model_query_side_scales(tmp_path, smollm2, capsys, monkeypatch):
    """`pear fold --format gguf` of query-side scales, one per channel, on every head of three layers:
    only those layers' attn_q tensors change, in their own type (each block lies in one row), and the
    stored rows are the folded query projection's in llama.cpp's interleaved order (SmolLM2 is a
    "llama" GGUF); without that permutation the file's logits miss and nothing is written."""
    import gguf

    from pear.export.scales import snapshot_site

    arch = resolve(smollm2.model)
    D, layers = arch.head_dim, (2, 16, 29)
    coefs, c, path = _fold_gguf_per_channel(tmp_path, smollm2.model, layers, site="query")
    assert "3 query (weight and bias) tensors re-weighted (Q4_1->Q4_1)" in capsys.readouterr().out
    a, b = gguf.GGUFReader(str(Path(smollm2.spec.path) / smollm2.spec.gguf_file)), gguf.GGUFReader(str(path))
    changed = {f"blk.{l}.attn_q.weight" for l in layers}
    assert set(json.loads(b.fields["pear.attn_q_types"].contents())) == changed
    assert json.loads((tmp_path / "g" / "pear.json").read_text())["site"] == "query"
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        same = t.tensor_type == tb[t.name].tensor_type and np.array_equal(t.data, tb[t.name].data)
        assert same != (t.name in changed), t.name
    restore = snapshot_site(smollm2.model, "query")
    try:
        fold(smollm2.model, coefs, site="query")
        folded_w = {l: arch.q_projs[l].weight.detach().numpy().copy() for l in layers}
    finally:
        restore()
    H = arch.n_heads
    for l, w in folded_w.items():  # GGUF row h*D + 2j + a holds HF row h*D + a*D/2 + j
        t = tb[f"blk.{l}.attn_q.weight"]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(H, D // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        assert np.abs(stored - w).max() <= 2e-3 * np.abs(w).max()
    monkeypatch.setattr(gguf_file, "PERMUTED_QUERY", set())
    assert main(["fold", "--model", "smollm2-135m", "--coefficients", str(c), "--format", "gguf",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "GGUF verification failed" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.real
def test_gguf_query_side_scales_on_an_unpermuted_file_scale_rows_and_bias(tmp_path, smollm2, capsys, monkeypatch):
    """Query-side scales on a "qwen2" GGUF (llama.cpp keeps its query rows in transformers' order and
    stores a query bias): one scale per channel on every head of layer 1 rescales that layer's attn_q
    rows in their own type (Q8_0) and its bias, row for row, and nothing else; the file's logits are
    the query-folded model's. Treated as permuted (as "llama" files are), the check refuses and nothing
    is written."""
    import gguf

    base = tmp_path / "tiny-qwen2.gguf"
    arch = resolve(tiny_gguf(base, "qwen2", Path(smollm2.spec.path) / smollm2.spec.gguf_file, initializer_range=0.1))
    H, D = arch.n_heads, arch.head_dim
    g = torch.Generator().manual_seed(0)
    coefs = {(1, h): (0.2 + 1.8 * torch.rand(D, generator=g)).tolist() for h in range(H)}
    c = tmp_path / "c.json"
    c.write_text(json.dumps(coefficients_json(coefs, site="query")))
    assert main(["fold", "--model", str(base), "--coefficients", str(c), "--format", "gguf",
                 "--out", str(tmp_path / "g")]) == 0
    assert "2 query (weight and bias) tensors re-weighted (F32->F32, Q8_0->Q8_0)" in capsys.readouterr().out
    (path,) = (tmp_path / "g").glob("*.pear.gguf")
    a, b = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(path))
    tb = {t.name: t for t in b.tensors}
    changed = {"blk.1.attn_q.weight", "blk.1.attn_q.bias"}
    for t in a.tensors:
        same = t.tensor_type == tb[t.name].tensor_type and np.array_equal(t.data, tb[t.name].data)
        assert same != (t.name in changed), t.name
    v = np.concatenate([coefs[(1, h)] for h in range(H)]).astype(np.float32)  # transformers' row order
    ta, t2 = {t.name: t for t in a.tensors}["blk.1.attn_q.weight"], tb["blk.1.attn_q.weight"]
    before, after = (gguf.quants.dequantize(t.data, t.tensor_type) for t in (ta, t2))
    assert np.abs(after - v[:, None] * before).max() <= 1e-3 * np.abs(after).max()  # d is stored as f16
    bias = {t.name: t for t in a.tensors}["blk.1.attn_q.bias"]
    np.testing.assert_allclose(tb["blk.1.attn_q.bias"].data, v * bias.data, rtol=1e-6)
    monkeypatch.setattr(gguf_file, "PERMUTED_QUERY", {"llama", "qwen2"})
    assert main(["fold", "--model", str(base), "--coefficients", str(c), "--format", "gguf",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "GGUF verification failed" in capsys.readouterr().err and not (tmp_path / "bad").exists()
