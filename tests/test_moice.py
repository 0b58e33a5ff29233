"""MoICE (pear.baselines.moice, moice_train): exactness, routing, router-only training, saving.

Exactness tests decode as the harness does (left padding, position ids from the mask, the
cache passed back opaquely), with test_baselines' helpers.
"""

import copy
import json

import pytest
import torch
from test_baselines import TINY, batch, decode, tiny
from tiny_models import VOCAB, tiny_model
from torch import nn

from pear.baselines import get_variant
from pear.baselines.moice import ROUTERS_FILE, SETTINGS_FILE, Routers, load_balancing_loss, routing_weights
from pear.baselines.moice_train import train_routers
from pear.errors import PearError


class Fixed(nn.Module):
    """A router that ignores its input: the same logits for every token and head."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, q):
        return self.logits.to(q.device).expand(*q.shape[:-1], len(self.logits))


def fixed_routers(model, bases, logits, top_k):
    r = Routers.for_model(model, bases=bases, top_k=top_k)
    for i in range(len(r.layers)):
        r.layers[i] = Fixed(logits)
    return r


@pytest.mark.parametrize("model_type", list(TINY) + ["gpt_neox"])
def test_one_expert_at_the_model_base_is_exactly_the_base_model(model_type):
    model = tiny(model_type, **TINY.get(model_type, {}))
    ids, mask = batch()
    base = decode(model, ids, mask)
    impl = model.config._attn_implementation
    with get_variant("moice").wrap(model, routers="init", bases=[10000]) as lm:  # 10000 scales to the model's base
        got = decode(lm, ids, mask)
        assert model.config._attn_implementation != impl  # really through our attention function
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(decode(model, ids, mask), base, rtol=0, atol=0)  # restored


def test_a_selected_expert_is_the_model_with_that_base():
    """Router fixed to expert 1 (top-1): RoPE base 300 at every layer, prefill and cached decoding."""
    model = tiny("llama")
    ref_model = tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 300.0})
    ref_model.load_state_dict(model.state_dict())
    ids, mask = batch()
    ref = decode(ref_model, ids, mask)
    with get_variant("moice").wrap(model, routers=fixed_routers(model, [10000, 300], [0.0, 3.0], 1)) as lm:
        got = decode(lm, ids, mask)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert (decode(model, ids, mask) - ref).abs().max() > 1e-3  # the reference really differs from the base


def test_experts_are_mixed_by_the_routing_weights():
    """Layer 0's head outputs (o_proj input) = w0 x expert 0's + w1 x expert 1's, w = softmax(logits)."""
    model = tiny("qwen2")
    ids, mask = batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        outs = []
        for logits, k in (([5.0, 0.0], 1), ([0.0, 5.0], 1), ([0.3, -0.4], 2)):
            with get_variant("moice").wrap(model, routers=fixed_routers(model, [10000, 300], logits, k)) as lm:
                lm(input_ids=ids, attention_mask=mask, position_ids=pos)
            outs.append(seen.pop())
    finally:
        h.remove()
    w = torch.softmax(torch.tensor([0.3, -0.4]), 0)
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    torch.testing.assert_close(outs[2], w[0] * outs[0] + w[1] * outs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", list(TINY) + ["gpt_neox"])
def test_experts_stacked_in_one_call_equal_experts_one_by_one(model_type):
    """Inference runs the seven experts in one attention call; prefill and cached decoding with
    left padding give the logits of running them one after the other (GQA, two RoPE bases per
    model with a sliding window, partial rotary)."""
    model = tiny(model_type, **TINY.get(model_type, {}))
    ids, mask = batch()
    routers = Routers.for_model(model, top_k=3, seed=2)
    with get_variant("moice").wrap(model, routers=routers) as lm:
        assert lm.stack
        stacked = decode(lm, ids, mask)
    with get_variant("moice").wrap(model, routers=routers, stack=False) as lm:
        one_by_one = decode(lm, ids, mask)
    torch.testing.assert_close(stacked, one_by_one, rtol=0, atol=1e-6)  # fp32 rounding of a batched kernel
    assert (stacked - decode(model, ids, mask)).abs().max() > 2e-5  # the experts do change the model


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_key_buffer_grows_while_decoding(monkeypatch, model_type):
    """The experts' keys are written in place into a buffer with room for a few more steps; when
    it is full it grows. Decoding across several growths gives the one-by-one logits (Gemma 3:
    sliding-window layers, whose cache keeps only the last keys)."""
    import pear.baselines.moice as moice_mod

    monkeypatch.setattr(moice_mod, "KEY_ROOM", 2)
    model = tiny(model_type, **TINY.get(model_type, {}))
    ids, mask = batch()
    routers = Routers.for_model(model, top_k=3, seed=2)
    rooms = []
    real = moice_mod.MoICE.__call__

    def record(self, *a, **k):
        out = real(self, *a, **k)
        buf, n = getattr(out.past_key_values, moice_mod._KEYS)[0]
        rooms.append((buf.shape[3], n))
        return out

    monkeypatch.setattr(moice_mod.MoICE, "__call__", record)
    with get_variant("moice").wrap(model, routers=routers) as lm, torch.no_grad():
        stacked = decode(lm, ids, mask, steps=7)
    monkeypatch.setattr(moice_mod.MoICE, "__call__", real)
    with get_variant("moice").wrap(model, routers=routers, stack=False) as lm, torch.no_grad():
        one_by_one = decode(lm, ids, mask, steps=7)
    torch.testing.assert_close(stacked, one_by_one, rtol=0, atol=1e-6)
    assert rooms[:4] == [(24, 24), (27, 25), (27, 26), (27, 27)]  # grown at the first step, then filled
    assert rooms[4] == (30, 28) and rooms[-1] == (33, 31)


def test_decoding_rotates_only_the_new_keys(monkeypatch):
    """The experts' rotated keys travel with the cache: after the prefill, a step rotates one
    query and one key per layer, not the whole cache; cutting rows keeps them in step."""
    import pear.baselines.moice as moice_mod

    model = tiny("llama")
    ids, mask = batch()
    sizes, real = [], moice_mod.rotate_cs
    monkeypatch.setattr(moice_mod, "rotate_cs", lambda x, c, s: sizes.append(x.shape[-2]) or real(x, c, s))
    with get_variant("moice").wrap(model, routers=Routers.for_model(model, top_k=3, seed=2)) as lm, torch.no_grad():
        got = decode(lm, ids, mask, steps=4)
        # prefill: q and k of 4 layers, one expert of 7 at a time; then 4 steps, all experts at once
        assert sizes == [24] * 7 * 2 * 4 + [1] * 2 * 4 * 4
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=True)
        keep = torch.tensor([0, 2])
        assert lm.select_cache_rows(out.past_key_values, keep, 2)
        nxt = out.logits[keep, -1].argmax(-1, keepdim=True)
        m2 = torch.cat([mask[keep], torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        sizes.clear()
        step = lm(input_ids=nxt, attention_mask=m2, position_ids=pos[keep, -1:] + 1,
                  past_key_values=out.past_key_values, use_cache=True)
        assert sizes == [1] * 2 * 4
        lm.stack = False
        ref = decode(lm, ids[keep], mask[keep], steps=1)
    torch.testing.assert_close(step.logits[:, -1].float(), ref[:, 1], rtol=0, atol=1e-5)
    assert got.shape[0] == 3


def test_routing_weights_and_balance_loss_follow_the_reference():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    w = routing_weights(z, 2)
    p = z.softmax(-1)
    torch.testing.assert_close(w[0], torch.tensor([p[0, 0], p[0, 1], 0.0]) / (p[0, 0] + p[0, 1]))
    torch.testing.assert_close(routing_weights(z, 3), p)
    # Switch loss: N * sum_e f_e P_e, f = top-1 frequency, P = mean probability
    f = torch.tensor([0.5, 0.0, 0.5])
    torch.testing.assert_close(load_balancing_loss([z], 1), 3 * (f * p.mean(0)).sum())
    # with K = N every expert is always selected: the constant N
    torch.testing.assert_close(load_balancing_loss([z, z * 2], 3), torch.tensor(3.0))


def sequences(n=6, T=48, seed=3):
    """Repeated random halves: copying needs attention, so routing matters."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(3, VOCAB, (n, T // 2), generator=g)
    return list(torch.cat([half, half], dim=1))


def position_sensitive_tiny():
    """A tiny llama whose attention is sharp (q, k scaled up), so the RoPE base matters."""
    model = tiny("llama", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def test_only_the_routers_get_gradients_and_the_model_is_untouched():
    model = position_sensitive_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routers = Routers.for_model(model, top_k=2)
    hist = train_routers(model, routers, sequences(2), steps=1, batch=2, lr=1e-2, aux_coef=0.3)
    assert all(p.grad is None for p in model.parameters())  # no gradient reached the model
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # flags put back
    assert hist[0]["aux"] > 1.0 and hist[0]["loss"] == pytest.approx(hist[0]["ce"] + 0.3 * hist[0]["aux"])


def test_training_recomputes_attention_same_gradients_less_memory():
    """With gradients on, each expert's attention is recomputed in the backward pass instead of
    kept (a 4k-token training step otherwise outgrows a GPU): the router gradients are the same,
    and what autograd keeps for the backward pass no longer grows with T x S."""
    from pear.baselines.moice import MoICE
    from pear.baselines.moice_train import sequence_loss

    model = position_sensitive_tiny().eval()
    model.config._attn_implementation = "eager"  # attention weights (T x S) kept by autograd
    routers = Routers(2, 16, [10000, 30, 300], 3, "silu", std=1.0, seed=1)
    seq = sequences(1, 128)[0]

    def step(recompute):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        routers.zero_grad(set_to_none=True)
        lm = MoICE(model, routers)
        lm.checkpoint = recompute
        with lm.active(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sequence_loss(lm, seq, 0.3)[0]
        loss.backward()
        return [p.grad.clone() for p in routers.parameters()], sum(saved)

    (g_kept, kept), (g_re, recomputed) = step(False), step(True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_kept, g_re))
    assert all(a.abs().sum() > 0 for a in g_re)
    assert recomputed < 0.6 * kept, (recomputed, kept)


def test_training_lowers_the_loss_on_a_tiny_model():
    """Routers initialised at std 1 (the default 0.02 makes a tiny model's gradients vanish)."""
    from pear.baselines.moice import MoICE
    from pear.baselines.moice_train import sequence_loss

    model = position_sensitive_tiny()
    data = sequences(4, 64)
    routers = Routers(2, 16, [10000, 30, 300], 3, "silu", std=1.0, seed=1)

    def loss():
        lm = MoICE(model, routers)
        with lm.active(), torch.no_grad():
            return sum(sequence_loss(lm, s, 0.3)[0].item() for s in data) / len(data)

    start = loss()
    hist = train_routers(model, routers, data, steps=8, batch=len(data), lr=3e-2, aux_coef=0.3)
    end = loss()
    assert end < start - 2e-3, (start, end)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[0]["aux"] == pytest.approx(3.0)  # K = N: the constant N


def test_micro_batches_of_unequal_sequences_give_the_same_training():
    """Several right-padded sequences per forward pass: the same per-sequence losses and router
    updates as one sequence at a time (padding after a sequence is invisible to it)."""
    model = position_sensitive_tiny()
    data = [s[:n] for s, n in zip(sequences(5, 48), [48, 30, 41, 17, 48])]
    runs = []
    for micro in (1, 2, 5):
        routers = Routers(2, 16, [10000, 30, 300], 2, "silu", std=1.0, seed=1)
        hist = train_routers(model, routers, data, steps=2, batch=5, lr=3e-2, aux_coef=0.3, micro_batch=micro)
        runs.append((hist, [p.detach().clone() for p in routers.parameters()]))
    (h1, p1), *others = runs
    assert h1[0]["aux"] > 1.0  # K < N: the balancing term is live, so per-sequence rows matter
    for h, ps in others:
        for a, b in zip(h1, h):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["aux"] == pytest.approx(b["aux"], rel=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(p1, ps))
    assert any((a - b).abs().max() > 0 for a, b in zip(p1, Routers(2, 16, [10000, 30, 300], 2, "silu", std=1.0,
                                                                   seed=1).parameters()))  # it trained


def test_a_resumed_training_equals_an_uninterrupted_one():
    model = position_sensitive_tiny()
    data = sequences(4, 32)

    def fresh():
        return Routers(2, 16, [10000, 30, 300], 2, "silu", std=1.0, seed=1)

    whole = fresh()
    h_whole = train_routers(model, whole, data, steps=3, batch=2, lr=3e-2, aux_coef=0.3)
    states = []
    first = fresh()
    train_routers(model, first, data, steps=1, batch=2, lr=3e-2, aux_coef=0.3,
                  on_step=lambda st: states.append(copy.deepcopy(st)))
    resumed = fresh()
    h = train_routers(model, resumed, data, steps=3, batch=2, lr=3e-2, aux_coef=0.3, resume=states[-1])
    assert [x["step"] for x in h] == [1, 2, 3]
    assert [x["loss"] for x in h] == [x["loss"] for x in h_whole]
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_routers_save_load_and_refuse_a_mismatch(tmp_path):
    model = tiny("llama")
    r = Routers.for_model(model, bases=[10000, 20000], top_k=1, seed=4)
    r.info = {"note": "x"}
    r.save(tmp_path)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["bases"] == [10000.0, 20000.0]
    back = Routers.load(tmp_path)
    assert back.top_k == 1 and back.info == {"note": "x"}
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), back.state_dict().values()))
    ids, mask = batch()
    with get_variant("moice").wrap(model, routers=str(tmp_path)) as lm:
        a = decode(lm, ids, mask, steps=1)
    with get_variant("moice").wrap(model, routers=r) as lm:
        b = decode(lm, ids, mask, steps=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(PearError, match="routers are for 4 layers"):
        with get_variant("moice").wrap(tiny("llama", layers=2), routers=str(tmp_path)):
            pass
    with pytest.raises(PearError, match="has no routers.safetensors"):
        with get_variant("moice").wrap(model, routers=str(tmp_path / "none")):
            pass
    with pytest.raises(PearError, match="needs trained routers"):
        with get_variant("moice").wrap(model):
            pass
    with pytest.raises(PearError, match="stack must be true or false"):
        with get_variant("moice").wrap(model, routers=str(tmp_path), stack="yes"):
            pass
    with pytest.raises(PearError, match="only with routers=init"):
        with get_variant("moice").wrap(model, routers=str(tmp_path), top_k=2):
            pass
    assert (tmp_path / ROUTERS_FILE).is_file()


@pytest.mark.parametrize("model_type,why", [("gpt2", "learned"), ("bloom", "ALiBi")])
def test_not_rope_is_not_applicable(model_type, why):
    with pytest.raises(PearError, match=f"moice is not applicable to {model_type} models: .*{why}"):
        with get_variant("moice").wrap(tiny_model(model_type), routers="init"):
            pass


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    from pear.cli import main

    out = tmp_path / "routers"
    assert main(["baseline", "train", "moice", "--out", str(out), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err and not out.exists()
    assert main(["baseline", "train", "moice", "--out", str(out), "--bases", "x,y"]) == 2
    assert "--bases" in capsys.readouterr().err and not out.exists()
    assert main(["baseline", "train", "moice", "--out", str(out), "--micro-batch", "0"]) == 2
    assert "--micro-batch" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.real
def test_real_model_train_save_and_evaluate(smollm2, tmp_path, data_dir):
    """SmolLM2: SQuAD sequences, one router step, saved; eval's variant loads them; the model is untouched."""
    from pear.baselines.moice_train import render_example, train_moice

    tok = smollm2.tokenizer
    text = render_example(tok, [("A", "first passage."), ("B", "second passage.")], "What?", "That.")
    assert "Passage 2 (B): second passage.\n\nQuestion: What?" in text and text.rstrip().endswith("That.<|im_end|>")
    before = smollm2.model.model.layers[0].self_attn.o_proj.weight.clone()
    s = train_moice("smollm2-135m", tmp_path / "r", steps=1, batch=1, seq_len=160, dtype="fp32", device="cpu",
                    data_dir=data_dir)
    assert s["n_layers"] == 30 and s["bases_scaled_to_model"]["all"][0] == 100000.0  # SmolLM2's own base
    assert s["data"]["tokens_mean"] <= 160 and s["data"]["passages_mean"] >= 1
    assert s["history"][0]["aux"] == pytest.approx(7.0) and s["training"]["lr"] == 1e-4
    enc = tok(["The capital of France is"], return_tensors="pt")
    base = decode(smollm2.model, enc.input_ids, enc.attention_mask, steps=2)
    with get_variant("moice").wrap(smollm2, routers=str(tmp_path / "r")) as lm:
        got = decode(lm, enc.input_ids, enc.attention_mask, steps=2)
    assert torch.isfinite(got).all() and (got - base).abs().max() > 1e-3
    assert torch.equal(before, smollm2.model.model.layers[0].self_attn.o_proj.weight)


@pytest.mark.real
def test_real_model_training_resumes_after_an_interruption(smollm2, tmp_path, data_dir, monkeypatch):
    """Stopped after its first step, the same call continues from DIR.resume.pt: the routers equal
    an uninterrupted run's, and the state file is gone once the routers are saved."""
    import pear.loading
    from pear.baselines.moice_train import resume_file, train_moice

    monkeypatch.setattr(pear.loading, "load_model", lambda *a, **k: smollm2)  # loaded once
    kw = dict(steps=2, batch=1, seq_len=64, lr=1e-2, dtype="fp32", device="cpu", data_dir=data_dir)
    train_moice("smollm2-135m", tmp_path / "whole", **kw)

    class Stop(Exception):
        pass

    def stop_after_first(h):
        if h["step"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train_moice("smollm2-135m", tmp_path / "r", progress=stop_after_first, **kw)
    assert resume_file(tmp_path / "r").is_file() and not (tmp_path / "r").exists()
    said = []
    s = train_moice("smollm2-135m", tmp_path / "r", log=said.append, **kw)
    assert said and "after step 1 of 2" in said[0] and s["training"]["resumed_after_step"] == 1
    assert not resume_file(tmp_path / "r").exists()
    a, b = Routers.load(tmp_path / "whole"), Routers.load(tmp_path / "r")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert [h["step"] for h in s["history"]] == [1, 2]
