"""`--prefill packed`: the prompts of a batch prefilled as one row without padding (variable-length
attention), then the eager or the continuous loop; on tiny random models in fp32, where every token
must equal the padded prefill's."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import CONFIGS, VOCAB, tiny_llama, tiny_model

from pear.errors import PearError
from pear.evaluate import ModelEntry, evaluate
from pear.evaluate import packed as pk
from pear.evaluate.generate import Forward, greedy_generate, left_pad
from pear.loading import LoadedModel, ModelSpec

pytestmark = pytest.mark.data

# not packed: softcapping and sliding windows (gemma2, gemma3), attention outside the interface (the rest)
NOT_PACKED = {"gemma2", "gemma3_text", "bloom", "mpt", "falcon", "gptj"}


@pytest.fixture(scope="module")
def tiny(smollm2_bf16):
    """A 2-layer random llama (4 query heads, 2 key/value heads) with SmolLM2's tokenizer."""
    tok = smollm2_bf16.tokenizer
    return LoadedModel(tiny_llama(tok), tok, ModelSpec("tiny", "folder", "/nonexistent/tiny"))


def _prompts(tok):
    words = "the cat sat on a mat while seven dogs ran across the wide green field near our old house".split()
    return [tok(" ".join(words[: 3 + (5 * k) % 17])).input_ids for k in range(11)]  # 11 prompts, 3-19 words


def _random_prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (3 + (5 * k) % 17,), generator=g).tolist() for k in range(11)]


def _assert_prefill_equals_padded(model, rows, pad_id, share=False):
    ids, mask, pos = left_pad(rows, pad_id, "cpu")
    with torch.no_grad():
        logits, past = Forward(model)(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None,
                                      use_cache=True)
    logits2, past2, mask2, pos2 = pk.packed_prefill(model, rows, pad_id, "cpu", share)
    assert logits2.shape == logits.shape == (len(rows), model.config.get_text_config().vocab_size)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask2, mask) and torch.equal(pos2, pos)
    real = mask.bool()[:, None, :, None]  # (B, 1, T, 1)
    assert len(past2.layers) == len(past.layers)
    for a, b in zip(past.layers, past2.layers):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)  # (B, KVH, T, D)
            assert y.shape == x.shape
            torch.testing.assert_close(torch.where(real, y, 0), torch.where(real, x, 0), atol=1e-5, rtol=1e-5)
            assert not torch.where(real, 0, y).any()  # padding columns: zeros


def test_packed_prefill_equals_padded_prefill(tiny):
    """Logits of each prompt's last token, the cache in its real columns, mask and positions: those
    of the left-padded prefill, for prompts of 3 to 19 words (grouped-query attention)."""
    rows = _prompts(tiny.tokenizer)
    assert len({len(r) for r in rows}) > 5 and tiny.model.config.num_key_value_heads < tiny.model.config.num_attention_heads
    _assert_prefill_equals_padded(tiny.model, rows, tiny.tokenizer.pad_token_id)
    _assert_prefill_equals_padded(tiny.model, rows[:1], tiny.tokenizer.pad_token_id)  # one prompt alone


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_prefill_in_every_family(family):
    """Every family of tiny_models that takes the packed prefill gives the padded prefill's
    results (one key/value head, head_dim apart from hidden/heads, partial rotary, learned
    positions); the others are refused."""
    model = tiny_model(family)
    assert pk.supports_packed(model) == (family not in NOT_PACKED)
    if family not in NOT_PACKED:
        _assert_prefill_equals_padded(model, _random_prompts(), 0)


def test_packed_decoding_equals_eager(tiny):
    """The eager loop after the packed prefill: every prompt's tokens equal the eager loop's,
    with rows stopping at different steps (rows dropped from the cache), batches of four, and a
    process's share of the batches."""
    tok = tiny.tokenizer
    ids = _prompts(tok)
    stop_after = [2, 9, 4, 6, 1, 10, 3, 7, 5, 8, 2]
    kw = dict(pad_id=tok.pad_token_id, eos_ids={2}, max_new_tokens=10, device="cpu", batch_size=4,
              done=lambda i, new: len(new) >= stop_after[i])
    eager = greedy_generate(tiny.model, ids, **kw)
    counts = []
    got = pk.PackedDecoder().generate(tiny.model, ids, on_batch=counts.append, **kw)
    assert got == eager and [len(o) for o in got] == stop_after and counts == [4, 4, 3]
    assert pk.PackedDecoder().generate(tiny.model, ids, **dict(kw, compact=False)) == eager
    mine = pk.PackedDecoder().generate(tiny.model, ids, batches=[[1, 4], [7]], **kw)
    assert [mine[i] for i in (1, 4, 7)] == [eager[i] for i in (1, 4, 7)] and mine[0] == []
    no_stop = dict(kw, done=None)
    assert pk.PackedDecoder().generate(tiny.model, ids, **no_stop) == greedy_generate(tiny.model, ids, **no_stop)


def test_attention_implementation_restored(tiny, monkeypatch):
    """The packed attention is switched on for the prefill only: the model's implementation
    (sdpa, or eager) comes back after it, also when the forward raises or the switch fails;
    outside a prefill the packed attention function refuses to run."""
    model, rows = tiny.model, _prompts(tiny.tokenizer)[:3]
    assert model.config._attn_implementation == "sdpa"
    seen, real = [], pk.packed_attention

    def spy(module, *a, **kw):
        seen.append(module.config._attn_implementation)
        return real(module, *a, **kw)

    monkeypatch.setattr(pk, "packed_attention", spy)
    pk.packed_prefill(model, rows, 0, "cpu")
    assert seen == [pk.NAME] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa" and pk._SEGMENTS.get() is None
    with pytest.raises(IndexError):  # a token outside the vocabulary: the forward raises
        pk.packed_prefill(model, [[5, 6], [10**6]], 0, "cpu")
    assert model.config._attn_implementation == "sdpa" and pk._SEGMENTS.get() is None
    model.set_attn_implementation("eager")
    try:
        pk.packed_prefill(model, rows, 0, "cpu")
        assert model.config._attn_implementation == "eager" and model.model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)  # a model that cannot switch
    with pytest.raises(PearError, match="cannot switch its attention"):
        pk.packed_prefill(model, rows, 0, "cpu")
    assert model.config._attn_implementation == "sdpa" and pk._SEGMENTS.get() is None
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="only inside packed_prefill"):
        real(None, q, q, q, None)


def test_packed_only_for_plain_full_attention_models(tiny, data_dir, capsys):
    """A variant's wrapper, sliding-window layers and softcapping keep the padded prefill (said once
    on stderr), with the same outputs; --prefill packed on the plain model gives eager's outputs."""
    from pear.baselines import get_variant

    assert pk.supports_packed(tiny.model)
    with get_variant("ms-poe").wrap(tiny) as lm:
        assert not pk.supports_packed(lm)
        with pytest.raises(PearError, match="--prefill packed takes"):
            pk.PackedDecoder().generate(lm, [[5, 6]], pad_id=0, eos_ids={2}, max_new_tokens=2, device="cpu")
    sliding = tiny_llama(tiny.tokenizer)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert not pk.supports_packed(sliding)
    capped = tiny_llama(tiny.tokenizer)
    capped.config.attn_logit_softcapping = 50.0
    assert not pk.supports_packed(capped)
    kw = dict(data_dir=data_dir, limit=3, progress=False, n_resamples=50, max_new_tokens=6, log_samples=True)
    eager = evaluate([tiny, ModelEntry(tiny, "ms-poe")], ["closedbook"], **kw)
    capsys.readouterr()
    packed = evaluate([tiny, ModelEntry(tiny, "ms-poe")], ["closedbook"], prefill="packed", **kw)
    err = capsys.readouterr().err
    assert [m["prefill"] for m in packed["models"]] == ["packed", "padded"] and packed["settings"]["prefill"] == "packed"
    assert err.count("prefills padded: --prefill packed takes plain transformers models") == 1
    assert packed["tasks"]["closedbook"]["models"] == eager["tasks"]["closedbook"]["models"]
    assert [s["output"] for s in packed["samples"]] == [s["output"] for s in eager["samples"]]


def _fake_varlen(version, calls, bottom_right=True):
    """A stand-in for torch's varlen_attn with the signature of a torch version, recording its
    arguments and computing causal SDPA prompt by prompt: (N, H, D) in and out. A prompt with fewer
    queries than keys is aligned as FlashAttention aligns it, its last query on its last key (or, with
    bottom_right=False, its first query on the first key: what the kernel must not do)."""

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, gqa):
        out = []
        for a, b, c, d in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:]):
            causal = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a) if bottom_right else 0)
            kk, vv = (x[c:d].transpose(0, 1)[None] for x in (k, v))  # (1, KVH, S, D)
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], kk, vv, attn_mask=causal, scale=scale,
                                               enable_gqa=gqa)  # (1, H, L, D)
            out.append(o[0].transpose(0, 1))
        return torch.cat(out)

    def record(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(dict(kw, q_heads=q.shape[1], k_heads=k.shape[1], cu=cu_q, cu_k=cu_k, same_cu=cu_k is cu_q,
                          max_q=max_q, max_k=max_k))
        return reference(q, k, v, cu_q, cu_k, max_q, max_k, kw.get("scale"), kw.get("enable_gqa", False))

    if version == "2.13":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            assert window_size == (-1, 0)
            return record(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                          enable_gqa=enable_gqa)
    elif version == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            assert window_size == (-1, 0) and key.shape[1] == query.shape[1]
            return record(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert is_causal and key.shape[1] == query.shape[1]
            return record(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    return varlen_attn


@pytest.mark.parametrize("version", ["2.13", "2.11", "2.10"])
def test_varlen_arguments_follow_the_torch_version(monkeypatch, version):
    """The CUDA path, run on CPU through a stand-in of varlen_attn: causal as window_size=(-1, 0)
    or is_causal=True, grouped key/value heads as enable_gqa or repeated to every query head, the
    module's scale as scale= or folded into the query (2.10 has no scale), the prompts' int32
    offsets and longest length; the same results as the loop over prompts."""
    model, rows = tiny_model("qwen2"), _random_prompts()
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.1  # not the kernel's default 1/sqrt(D)
    assert pk._kernel(torch.zeros(1, 4, 3, 16)) is None  # CPU: the loop over prompts
    ref = pk.packed_prefill(model, rows, 0, "cpu")
    calls = []
    fake = _fake_varlen(version, calls)
    monkeypatch.setattr(pk, "_kernel", lambda query: fake)
    got = pk.packed_prefill(model, rows, 0, "cpu")
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(ref[1].layers, got[1].layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
    cfg = model.config
    assert len(calls) == cfg.num_hidden_layers
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    for c in calls:
        assert c["cu"].dtype == torch.int32 and c["cu"].tolist() == offsets and c["same_cu"]
        assert c["max_q"] == c["max_k"] == max(map(len, rows)) and c["q_heads"] == cfg.num_attention_heads
        if version == "2.13":
            assert c["enable_gqa"] and c["window_size"] == (-1, 0) and c["k_heads"] == cfg.num_key_value_heads
            assert c["scale"] == 0.1
        elif version == "2.11":
            assert "enable_gqa" not in inspect.signature(fake).parameters and c["k_heads"] == cfg.num_attention_heads
            assert c["window_size"] == (-1, 0) and c["scale"] == 0.1
        else:
            assert c["is_causal"] and c["k_heads"] == cfg.num_attention_heads and "scale" not in c


def test_continuous_batching_with_a_packed_prefill_equals_eager(tiny, monkeypatch):
    """Continuous batching whose joining prompts are prefilled packed: the tokens of the eager loop
    (fp32), through joins, drops and cuts, and every prefill of the run went through the packed one."""
    from pear.evaluate import continuous as cont

    tok = tiny.tokenizer
    words = "the cat sat on a mat while seven dogs ran across the wide green field near our old house".split()
    ids = [tok(" ".join(words[: 3 + (5 * k) % 17])).input_ids for k in range(11)]
    stop_after = [2, 9, 4, 6, 1, 10, 3, 7, 5, 8, 2]
    kw = dict(pad_id=tok.pad_token_id, eos_ids={2}, max_new_tokens=10, device="cpu", batch_size=4,
              done=lambda i, new: len(new) >= stop_after[i])
    eager = greedy_generate(tiny.model, ids, **kw)
    calls = []
    monkeypatch.setitem(pk.PREFILLS, "packed", lambda *a, _r=pk.packed_prefill: calls.append(len(a[1])) or _r(*a))
    dec = cont.ContinuousDecoder("packed")
    assert (dec.name, dec.decode, dec.prefill) == ("continuous+packed", "continuous", "packed")
    assert dec.generate(tiny.model, ids, **kw) == eager
    assert len(calls) > 1 and sum(calls) == len(ids)  # the first batch and the joins, all packed



def test_compiled_prefill_equals_the_packed_prefill_and_leaves_the_model_as_it_was(tiny):
    """`--prefill compiled`: the decoder blocks compiled (symbolic shapes) give the packed prefill's logits
    and cache (fp32), for a second batch of other lengths too without compiling again per block, and the
    model holds its own blocks again afterwards (decoding runs it uncompiled)."""
    model = tiny.model
    blocks = list(model.model.layers)
    rows = _random_prompts()
    for batch in (rows, [r[:-1] for r in rows[2:]]):
        logits, past, mask, pos = pk.packed_prefill(model, batch, 0, "cpu")
        logits2, past2, mask2, pos2 = pk.compiled_prefill(model, batch, 0, "cpu")
        torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(mask2, mask) and torch.equal(pos2, pos)
        for a, b in zip(past.layers, past2.layers):
            torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
        assert all(x is y for x, y in zip(model.model.layers, blocks))
    compiled = pk._COMPILED[model]
    assert len(compiled) == len(blocks) and all(c._orig_mod is b for c, b in zip(compiled, blocks))


def test_compiled_prefill_compiles_every_block_of_a_deep_model(monkeypatch):
    """Each block's graph is specialised on its layer index, so a model of more blocks than dynamo's
    recompile limit (8) ran its later blocks uncompiled (measured on an H100): the limit is raised to
    twice the blocks for the prefill alone, and a 12-block model compiles 4 frames more than an 8-block one."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    seen, real = [], pk.packed_prefill
    monkeypatch.setattr(pk, "packed_prefill", lambda *a: seen.append(torch._dynamo.config.recompile_limit) or real(*a))
    default, rows, frames = torch._dynamo.config.recompile_limit, [[5, 6, 7, 8, 9, 10], [3, 4]], {}
    for n in (8, 12):
        cfg = AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=n,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        torch._dynamo.reset()
        counters.clear()
        logits = pk.compiled_prefill(model, rows, 0, "cpu")[0]
        frames[n] = counters["frames"]["ok"]
        assert seen[-1] == max(default, 2 * n) and torch._dynamo.config.recompile_limit == default
        torch.testing.assert_close(logits, real(model, rows, 0, "cpu")[0], atol=1e-5, rtol=1e-5)
    assert frames[12] - frames[8] >= 4  # every block past the eighth compiled too


def test_grouped_heads_go_to_flash_unrepeated_where_it_takes_them(monkeypatch):
    """A torch whose varlen_attn has no enable_gqa (2.11): where the FlashAttention operator takes grouped
    key/value heads (tried once per device and dtype against the repeated heads), the packed prefill hands
    them over unrepeated and gets the loop's results; where it refuses them or disagrees, the heads are
    repeated as before."""
    model, rows = tiny_model("qwen2"), _random_prompts()
    ref = pk.packed_prefill(model, rows, 0, "cpu")
    calls, grouped = [], []
    fake = _fake_varlen("2.11", calls)  # asserts equal heads

    def sdpa_grouped(q, k, v, seg, scale):  # the operator's contract, computed prompt by prompt
        grouped.append(k.shape[1])
        out = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                                              scale=scale, enable_gqa=True)[0].transpose(0, 1)
               for a, b in zip(seg.starts[:-1], seg.starts[1:])]
        return torch.cat(out)

    monkeypatch.setattr(pk, "_kernel", lambda query: fake)
    check = pk.flash_takes_groups.__wrapped__
    monkeypatch.setattr(pk, "flash_grouped", sdpa_grouped)
    assert check("cpu", torch.float32)
    monkeypatch.setattr(pk, "flash_takes_groups", lambda device, dtype: True)
    calls.clear()
    got = pk.packed_prefill(model, rows, 0, "cpu")
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(ref[1].layers, got[1].layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
    kv = model.config.num_key_value_heads
    assert not calls and grouped[1:] == [kv] * model.config.num_hidden_layers  # after the check's, unrepeated

    def refuses(*a):
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    for bad in (refuses, lambda q, k, v, seg, scale: torch.zeros_like(q)):
        monkeypatch.setattr(pk, "flash_grouped", bad)
        assert not check("cpu", torch.float32)
        monkeypatch.setattr(pk, "flash_takes_groups", lambda device, dtype: False)
        calls.clear()
        got = pk.packed_prefill(model, rows, 0, "cpu")
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        assert len(calls) == model.config.num_hidden_layers and all(c["k_heads"] == c["q_heads"] for c in calls)
    monkeypatch.setattr(pk, "_kernel", lambda query: _fake_varlen("2.13", []))
    assert not check("cpu", torch.float32)  # a varlen_attn with enable_gqa needs no operator of its own


def _sharing_prompts():
    """Prompts that share prefixes in every way: a question's variants (one prefix, then each its own
    tail), a prompt equal to an earlier one, one that is a prefix of an earlier one, one that shares a
    prefix only with a prompt further back than SHARE_WINDOW (not looked for), and unrelated ones."""
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    head = rand(12)
    rows = [head + rand(5), head + rand(3), head[:7] + rand(6), list(head + rand(2)), head[:5]]
    rows.append(list(rows[1]))  # the same prompt again
    rows += [rand(4) for _ in range(pk.SHARE_WINDOW)]
    rows.append(head + rand(1))  # its neighbours share nothing with it: computed whole
    return rows


def test_shared_prefixes_are_computed_once_and_change_nothing(tiny):
    """--prefill packed-shared: a prompt's longest prefix held by one of the few prompts before it is
    not computed again (the row holds only the other tokens; every prompt keeps its last one), its keys
    and values come from that prompt, and logits, cache, mask and positions are the padded prefill's
    (fp32, grouped-query attention), through the compiled blocks too."""
    model, rows = tiny_model("qwen2"), _sharing_prompts()
    shared, source = pk.shared_prefixes(rows)
    assert shared == [0, 12, 7, 12, 4, 14, *[0] * pk.SHARE_WINDOW, 0]
    assert source[1:6] == [0, 1, 1, 3, 1]  # of equal prefixes, the nearest prompt's
    assert pk.shared_prefixes([[5, 6, 7]] * 3) == ([0, 2, 2], [-1, 0, 1])  # the last token stays each prompt's own
    assert pk.shared_prefixes([[1, 2], [1, 2, 3], [1]]) == ([0, 2, 0], [-1, 0, -1])
    assert pk.shared_prefixes([]) == ([], [])
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape[-1]))
    try:
        _assert_prefill_equals_padded(model, rows, 0, share=True)
    finally:
        hook.remove()
    assert seen[-1] == sum(map(len, rows)) - sum(shared)  # after the padded forward, the packed one
    ref = pk.packed_prefill(model, rows, 0, "cpu")
    got = pk.compiled_prefill(model, rows, 0, "cpu", True)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(ref[1].layers, got[1].layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
    assert set(pk.PREFILLS) >= {"packed-shared", "compiled-shared"}


@pytest.mark.parametrize("version", ["2.13", "2.11"])
def test_shared_prefixes_reach_flash_as_fewer_queries_than_keys(monkeypatch, version):
    """The CUDA path on CPU through a stand-in of varlen_attn: queries are each prompt's own tokens,
    keys its whole prompt (offsets apart, the longest of each), and the results are the loop's. The
    one-time check takes a kernel that aligns such a prompt from the bottom right and refuses one that
    does not; refused, the prefill shares nothing and is still right."""
    model, rows = tiny_model("qwen2"), _sharing_prompts()
    shared, _ = pk.shared_prefixes(rows)
    ref = pk.packed_prefill(model, rows, 0, "cpu")
    check = pk.flash_shares_prefixes.__wrapped__
    monkeypatch.setattr(pk, "flash_takes_groups", lambda device, dtype: False)
    for bottom_right in (True, False):
        calls = []
        monkeypatch.setattr(pk, "_kernel", lambda query: _fake_varlen(version, calls, bottom_right))
        assert check("cpu", torch.float32) == bottom_right
        monkeypatch.setattr(pk, "flash_shares_prefixes", lambda device, dtype: bottom_right)
        calls.clear()
        got = pk.packed_prefill(model, rows, 0, "cpu", True)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(ref[1].layers, got[1].layers):
            torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
        assert len(calls) == model.config.num_hidden_layers
        own = [len(r) - k for r, k in zip(rows, shared)] if bottom_right else list(map(len, rows))
        for c in calls:
            assert c["cu"].tolist() == [0, *np.cumsum(own).tolist()] and c["max_q"] == max(own)
            assert c["cu_k"].dtype == torch.int32 and c["cu_k"].tolist() == [0, *np.cumsum([len(r) for r in rows])]
            assert c["max_k"] == max(map(len, rows)) and c["same_cu"] == (not bottom_right)
