"""The decoding loop, the variant contract, the runner and `pear eval`, on a tiny random
llama that uses the real SmolLM2 tokenizer (fast; the real model is in test_eval_real.py)."""

import functools
import gzip
import json

import pytest
import torch
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from pear.errors import PearError
from pear.evaluate import ModelEntry, evaluate, save_results
from pear.evaluate import runner as runner_mod
from pear.evaluate.generate import greedy_generate, make_batches, next_token_logprobs
from pear.loading import LoadedModel, ModelSpec

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def tiny(smollm2_bf16):
    """A 2-layer random llama with SmolLM2's tokenizer and a 256-token window."""
    tok = smollm2_bf16.tokenizer
    return LoadedModel(tiny_llama(tok), tok, ModelSpec("tiny", "folder", "/nonexistent/tiny"))


PROMPTS = ["Question: what is the capital of France?\nAnswer:", "Hi",
           "The quick brown fox jumps over the lazy dog. " * 3]


def _ids(tok):
    return [tok(p).input_ids for p in PROMPTS]


class Opaque:
    """Hides the cache: any indexing or attribute use by the caller fails."""

    def __init__(self, inner):
        self._inner = inner


def strict_lm(model, calls):
    """A variant-like callable: only the contract's keyword arguments, an opaque cache."""
    def lm(*, input_ids, attention_mask, position_ids, past_key_values, use_cache):  # no logits_to_keep
        calls.append(input_ids.shape)
        past = past_key_values._inner if isinstance(past_key_values, Opaque) else past_key_values
        assert past_key_values is None or isinstance(past_key_values, Opaque)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past, use_cache=use_cache)
        return type("Out", (), {"logits": out.logits, "past_key_values": Opaque(out.past_key_values)})()
    return lm


def test_make_batches_respects_limits():
    lengths = [5, 100, 30, 30, 7, 64, 1]
    batches = make_batches(lengths, batch_size=3, max_batch_tokens=200, extra=10)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and len(b) * (max(lengths[i] for i in b) + 10) <= 200 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_batched_left_padded_equals_one_by_one(tiny):
    ids = _ids(tiny.tokenizer)
    kw = dict(pad_id=tiny.tokenizer.pad_token_id, eos_ids={2}, max_new_tokens=8, device="cpu")
    together = greedy_generate(tiny.model, ids, batch_size=3, **kw)
    alone = greedy_generate(tiny.model, ids, batch_size=1, **kw)
    assert together == alone and all(len(o) == 8 for o in together)
    ref = [tiny.model.generate(torch.tensor([x]), do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(x):]
           .tolist() for x in ids]
    assert together == ref


def test_variant_contract_only(tiny):
    """Through a callable that accepts only the contract's arguments and hides its cache,
    generation and log-likelihoods equal those of the bare model."""
    ids = _ids(tiny.tokenizer)
    kw = dict(pad_id=tiny.tokenizer.pad_token_id, device="cpu", batch_size=2)
    calls = []
    lm = strict_lm(tiny.model, calls)
    assert greedy_generate(lm, ids, eos_ids={2}, max_new_tokens=5, **kw) == \
        greedy_generate(tiny.model, ids, eos_ids={2}, max_new_tokens=5, **kw)
    assert calls and calls[1][1] == 1  # prefill, then one token at a time
    a = next_token_logprobs(lm, ids, [330, 389], **kw)
    b = next_token_logprobs(tiny.model, ids, [330, 389], **kw)
    assert a.shape == (3, 2) and (a < 0).all() and abs(a - b).max() < 1e-5


def test_stops_when_done_and_at_eos(tiny):
    ids = _ids(tiny.tokenizer)[:1]
    kw = dict(pad_id=0, device="cpu", max_new_tokens=8)
    full = greedy_generate(tiny.model, ids, eos_ids={2}, **kw)[0]
    assert greedy_generate(tiny.model, ids, eos_ids={2}, done=lambda i, new: len(new) == 3, **kw)[0] == full[:3]
    assert greedy_generate(tiny.model, ids, eos_ids={full[2]}, **kw)[0] == full[:2]  # EOS not kept


def test_evaluate_two_entries_skips_and_pairs(tiny, data_dir, tmp_path):
    res = evaluate([tiny, ModelEntry(tiny, label="copy")], ["closedbook", "oracle", "mmlu"], data_dir=data_dir,
                   limit=6, log_samples=True, progress=False, n_resamples=200, max_new_tokens=40)
    assert [m["label"] for m in res["models"]] == ["tiny", "copy"]
    cb, orc, mm = (res["tasks"][t] for t in ("closedbook", "oracle", "mmlu"))
    assert cb["models"]["tiny"]["all"]["n"] == 6 and cb["models"]["tiny"]["all"]["skipped"] == 0
    # most oracle prompts (~250 tokens) + 40 new tokens exceed the 256-token window: skipped, counted
    o = orc["models"]["tiny"]["1"]
    assert o["skipped"] >= 1 and o["n"] + o["skipped"] == 6
    for x in res["samples"]:
        assert x["skipped"] == (x["n_prompt_tokens"] + (40 if x["task"] != "mmlu" else 0) > 256)
        assert (x["score"] is None) == x["skipped"] and (x["output"] is None) == x["skipped"]
    p = cb["paired"]["copy"]["conditions"]["all"]
    assert p["n"] == 6 and p["diff"] == 0 and p["p_mcnemar"] == 1.0
    assert mm["models"]["tiny"]["all"]["n"] == 6 and len(mm["models"]["tiny"]["subjects"]) == 6
    s = [x for x in res["samples"] if x["task"] == "closedbook"][0]
    assert s["prompt"].startswith("<|im_start|>system\n")
    assert s["prompt"].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    m = [x for x in res["samples"] if x["task"] == "mmlu"][0]
    assert "<|im_start|>" not in m["prompt"] and m["output"] in "ABCD" and len(m["logprobs"]) == 4
    written = save_results(res, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["limit"] == 6
    assert written["plot"].stat().st_size > 1000
    assert written["table"] == tmp_path / "r.md" and written["table"].read_text().count("\n| closedbook |") == 1
    with gzip.open(written["samples"], "rt") as f:
        assert len(f.readlines()) == 2 * (6 + 6 + 6)


def test_prompts_rendered_once_per_loaded_model(tiny, data_dir, monkeypatch):
    """Entries sharing a loaded model (base and its variants) render each task once; another
    model renders its own."""
    calls, real = [], runner_mod.render_prompts
    monkeypatch.setattr(runner_mod, "render_prompts", lambda loaded, task, chat: calls.append((id(loaded), task.name))
                        or real(loaded, task, chat))
    other = LoadedModel(tiny.model, tiny.tokenizer, ModelSpec("other", "folder", "/nonexistent/other"))
    kw = dict(data_dir=data_dir, limit=3, progress=False, n_resamples=100, max_new_tokens=4)
    res = evaluate([tiny, ModelEntry(tiny, label="copy"), ModelEntry(other, label="other")], ["closedbook", "mmlu"], **kw)
    assert sorted(calls) == sorted((id(m), t) for m in (tiny, other) for t in ("closedbook", "mmlu"))
    for t in ("closedbook", "mmlu"):  # the shared prompts give the same outputs
        assert res["tasks"][t]["paired"]["copy"]["conditions"]["all"]["diff"] == 0
        assert res["tasks"][t]["paired"]["other"]["conditions"]["all"]["diff"] == 0


def test_resume_reuses_parts(tiny, data_dir, tmp_path, monkeypatch):
    kw = dict(data_dir=data_dir, limit=3, progress=False, n_resamples=100, parts_dir=tmp_path / "parts",
              max_new_tokens=4)
    first = evaluate([tiny], ["closedbook"], **kw)
    assert len(list((tmp_path / "parts").iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("should have been reused")
    monkeypatch.setattr(runner_mod, "run_task", boom)
    again = evaluate([tiny], ["closedbook"], **kw)
    assert again["tasks"] == first["tasks"]
    with pytest.raises(AssertionError, match="reused"):  # other examples: not reused
        evaluate([tiny], ["closedbook"], **dict(kw, limit=4))


def test_parts_only_assembles(tiny, data_dir, tmp_path, monkeypatch, capsys):
    """Separate runs on one parts folder: "only" computes nothing, leaves out what is missing,
    and assembles what is there into the result of one whole run; a table whose parts were computed
    by different numbers of processes says so (results and stderr)."""
    from pear.evaluate import cache as cache_mod

    monkeypatch.setattr(cache_mod, "PART_SIZE", 2)
    monkeypatch.setattr(runner_mod, "PART_SIZE", 2)  # closedbook, 3 questions: parts of 2 + 1
    kw = dict(data_dir=data_dir, limit=3, progress=False, n_resamples=100, max_new_tokens=4)
    whole = evaluate([tiny], ["closedbook"], **kw)
    parts = tmp_path / "parts"
    calls = []
    real = runner_mod.run_task
    monkeypatch.setattr(runner_mod, "run_task", lambda *a, **k: calls.append(len(a[2].examples)) or real(*a, **k))

    nothing = evaluate([tiny], ["closedbook"], parts_dir=parts, parts="only", **kw)
    assert calls == [] and nothing["missing"] == [{"label": "tiny", "task": "closedbook"}]
    assert nothing["tasks"]["closedbook"]["models"] == {}

    evaluate([tiny], ["closedbook"], parts_dir=parts, **dict(kw, limit=2))  # an earlier run: the first part
    assert calls == [2]
    evaluate([tiny], ["closedbook"], parts_dir=parts, **kw)  # reuses it, computes the second
    assert calls == [2, 1] and len(list(parts.glob("*.json.gz"))) == 2
    calls.clear()
    done = evaluate([tiny], ["closedbook"], parts_dir=parts, parts="only", **kw)
    assert calls == [] and "missing" not in done and done["tasks"] == whole["tasks"]
    assert done["timing"]["tiny"]["closedbook"]["parts_by_processes"] == {"1": 2}
    first = sorted(parts.glob("*.json.gz"), key=lambda f: json.load(gzip.open(f))["start"])[0]
    stored = json.load(gzip.open(first))
    with gzip.open(first, "wt") as f:  # as if 8 processes had computed the first part
        json.dump(dict(stored, processes=8), f)
    capsys.readouterr()
    mixed = evaluate([tiny], ["closedbook"], parts_dir=parts, parts="only", **kw)
    assert mixed["tasks"] == whole["tasks"]
    assert mixed["timing"]["tiny"]["closedbook"]["parts_by_processes"] == {"1": 1, "8": 1}
    assert "tiny closedbook: parts computed by 1 and 8 processes" in capsys.readouterr().err
    with pytest.raises(PearError, match="parts-dir"):
        evaluate([tiny], ["closedbook"], parts="only", **kw)
    with pytest.raises(PearError, match="reuse or only"):
        evaluate([tiny], ["closedbook"], parts_dir=parts, parts="claim", **kw)


def test_cache_keyed_on_content_not_dates(tiny, data_dir, tmp_path, monkeypatch):
    """A model folder touched, or copied elsewhere, reuses its results; one changed weight does not."""
    import os
    import shutil

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    kw = dict(data_dir=data_dir, limit=2, progress=False, n_resamples=100, max_new_tokens=3,
              parts_dir=tmp_path / "parts", device="cpu")
    calls = []
    real = runner_mod.run_task
    monkeypatch.setattr(runner_mod, "run_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = evaluate([str(folder)], ["closedbook"], **kw)
    assert calls == [1] and (tmp_path / "cache" / "hashes.json").is_file()
    for f in folder.iterdir():
        os.utime(f, (1_000_000, 1_000_000))
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    again = evaluate([str(copy)], ["closedbook"], **kw)
    assert calls == [1] and again["tasks"]["closedbook"]["models"][str(copy)] == \
        first["tasks"]["closedbook"]["models"][str(folder)]
    changed = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1.0
    changed.save_pretrained(folder)
    evaluate([str(folder)], ["closedbook"], **kw)
    assert calls == [1, 1]


def test_cli_end_to_end(tiny, data_dir, tmp_path, capsys):
    from pear.cli import main

    folder = tmp_path / "tiny"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", "--model", str(folder), "--label", "a", "--model", str(folder), "--variant", "none",
               "--task", "closedbook,kv-4", "--limit", "2", "--positions", "first,last", "--data-dir", str(data_dir),
               "--device", "cpu", "--out", str(out), "--no-progress", "--bootstrap", "100", "--max-new-tokens", "4"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [m["label"] for m in res["models"]] == ["a", str(folder)]
    assert res["tasks"]["kv-4"]["conditions"] == ["1", "4", "all"]
    assert res["settings"]["command"].startswith("pear eval --model")
    assert out.with_suffix(".png").is_file()
    table = capsys.readouterr().out
    assert "kv-4" in table and "closedbook" in table
    assert main(["eval", "--model", str(folder), "--variant", "no-such", "--task", "closedbook",
                 "--out", str(out), "--data-dir", str(data_dir)]) == 2
    assert "unknown variant" in capsys.readouterr().err
    # the positional-hidden variant from the command line: a weight edit while it runs, the folder untouched
    before = (folder / "model.safetensors").read_bytes()
    rc = main(["eval", "--model", str(folder), "--label", "base", "--model", str(folder), "--variant",
               "positional-hidden", "--variant-option", "dims=5,9", "--variant-option", "layers=0-1",
               "--variant-option", "factor=-2", "--label", "ph", "--task", "kv-4", "--limit", "2",
               "--data-dir", str(data_dir), "--device", "cpu", "--out", str(out), "--no-progress",
               "--bootstrap", "100", "--max-new-tokens", "4", "--force"])
    assert rc == 0 and (folder / "model.safetensors").read_bytes() == before
    res = json.loads(out.read_text())
    assert res["models"][1]["variant"] == "positional-hidden"
    assert res["models"][1]["variant_options"] == {"dims": [5, 9], "layers": "0-1", "factor": -2}
    assert res["models"][1]["variant_info"] == {"dims": [5, 9], "layers": [0, 1], "factor": -2.0, "search": None}
    assert "variant_info" not in res["models"][0]
    # the rope-bands variant likewise: the queries' slow pairs scaled, the folder untouched
    rc = main(["eval", "--model", str(folder), "--variant", "rope-bands", "--variant-option", "bands=slow",
               "--variant-option", "layers=0-1", "--variant-option", "factor=2", "--label", "rb", "--task", "kv-4",
               "--limit", "2", "--data-dir", str(data_dir), "--device", "cpu", "--out", str(out), "--no-progress",
               "--bootstrap", "100", "--max-new-tokens", "4", "--force"])
    assert rc == 0 and (folder / "model.safetensors").read_bytes() == before
    info = json.loads(out.read_text())["models"][0]["variant_info"]
    assert info == {"bands": [6, 7], "layers": [0, 1], "factor": 2.0}
    with pytest.raises(SystemExit):
        main(["eval", "--variant", "none", "--model", str(folder), "--task", "kv", "--out", str(out)])
    with pytest.raises(PearError, match="not found in"):
        evaluate([tiny], ["kv"], data_dir=tmp_path)


@pytest.mark.parametrize("variant", ["none", "ms-poe", "attention-buckets"])
def test_dropping_finished_rows_changes_nothing(tiny, variant):
    """Rows that finish early are cut out of the batch and of the cache (the model's own and a
    variant's extra state); every row's tokens equal those of a run that keeps all rows."""
    from pear.baselines import get_variant
    from pear.evaluate import generate as gen

    ids = _ids(tiny.tokenizer) + [tiny.tokenizer("Paris is a city in").input_ids]
    stop_after = {0: 2, 1: 9, 2: 4, 3: 6}  # rows finish at different steps
    kw = dict(pad_id=tiny.tokenizer.pad_token_id, eos_ids={2}, max_new_tokens=10, device="cpu", batch_size=4,
              done=lambda i, new: len(new) >= stop_after[i])
    with get_variant(variant).wrap(tiny) as lm:
        cuts = []
        orig = gen.select_cache_rows
        gen.select_cache_rows = lambda *a: cuts.append(len(a[2])) or orig(*a)
        try:
            compacted = greedy_generate(lm, ids, **kw)
        finally:
            gen.select_cache_rows = orig
        full = greedy_generate(lm, ids, compact=False, **kw)
    assert compacted == full and [len(o) for o in full] == [2, 9, 4, 6]
    assert cuts and cuts[0] == 3  # the first cut keeps the three rows still running


@pytest.mark.parametrize("variant", ["none", "moice"])
def test_continuous_batching_equals_eager(tiny, monkeypatch, variant):
    """Rows that finish make room for waiting prompts, prefilled together and joined to the
    running cache left-padded; columns no row attends to are cut: every prompt's tokens equal
    the eager loop's (fp32), through joins, drops and cuts; under MoICE too (its positions and
    experts' keys are joined and cut with the cache)."""
    from pear.baselines import get_variant

    # MoICE with bases far apart, so that a key rotated at a wrong position changes the tokens
    opts = {"routers": "init", "bases": [10000.0, 300.0, 3e5]} if variant == "moice" else {}
    with get_variant(variant).wrap(tiny, **opts) as lm:
        _continuous_equals_eager(tiny, lm, monkeypatch)
    if variant == "moice":  # joined experts' keys dropped: re-rotated from the joined positions, the same tokens
        from pear.baselines import moice

        join = moice.MoICE.join_cache_state
        monkeypatch.setattr(moice.MoICE, "join_cache_state",
                            lambda self, past, *a: join(self, past, *a) or setattr(past, moice._KEYS, {}))
        with get_variant(variant).wrap(tiny, **opts) as lm:
            _continuous_equals_eager(tiny, lm, monkeypatch)


def _joining_prompts(tok):
    """11 prompts of 3-19 words, each stopping after its own number of tokens, and the decoding
    arguments for 4 rows: enough for rows to finish and others to join several times."""
    words = "the cat sat on a mat while seven dogs ran across the wide green field near our old house".split()
    ids = [tok(" ".join(words[: 3 + (5 * k) % 17])).input_ids for k in range(11)]
    stop_after = [2, 9, 4, 6, 1, 10, 3, 7, 5, 8, 2]
    kw = dict(pad_id=tok.pad_token_id, eos_ids={2}, max_new_tokens=10, device="cpu", batch_size=4,
              done=lambda i, new: len(new) >= stop_after[i])
    return ids, stop_after, kw


def _continuous_equals_eager(tiny, lm, monkeypatch):
    from pear.evaluate import continuous as cont

    ids, stop_after, kw = _joining_prompts(tiny.tokenizer)
    eager = greedy_generate(lm, ids, **kw)
    joins, cuts, done_counts = [], [], []
    for name, seen in (("_join", joins), ("_trim", cuts)):
        real = getattr(cont, name)
        monkeypatch.setattr(cont, name, lambda *a, _r=real, _s=seen: _s.append(a[1:]) or _r(*a))
    got = cont.continuous_generate(lm, ids, on_batch=done_counts.append, **kw)
    assert got == eager and [len(o) for o in got] == stop_after
    assert joins and cuts and sum(done_counts) == len(ids)
    # the share of one process (`batches`) only: the others stay empty
    mine = cont.continuous_generate(lm, ids, batches=[[1, 4], [7]], **kw)
    assert [mine[i] for i in (1, 4, 7)] == [eager[i] for i in (1, 4, 7)] and mine[0] == []
    # a tight token budget: fewer rows join at a time, the same tokens
    assert cont.continuous_generate(lm, ids, **dict(kw, max_batch_tokens=60)) == eager
    # prompts whose prefill runs out of memory go back to the queue and join fewer at a time
    real_call, sizes = cont.Forward.__call__, []

    def oom_above_two(self, **k):
        if k["past_key_values"] is None:
            sizes.append(k["input_ids"].shape[0])
            if k["input_ids"].shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real_call(self, **k)
    monkeypatch.setattr(cont.Forward, "__call__", oom_above_two)
    assert cont.continuous_generate(lm, ids, **kw) == eager
    assert sizes[0] == 4 and max(sizes[1:]) <= 2


def test_continuous_batching_only_for_whole_caches(tiny, data_dir):
    """Variants and sliding-window layers keep the eager loop (said once), with the same outputs."""
    from pear.baselines import get_variant
    from pear.evaluate.continuous import supports_continuous

    assert supports_continuous(tiny.model)
    with get_variant("ms-poe").wrap(tiny) as lm:
        assert not supports_continuous(lm)
    sliding = tiny_llama(tiny.tokenizer)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert not supports_continuous(sliding)
    kw = dict(data_dir=data_dir, limit=3, progress=False, n_resamples=50, max_new_tokens=6)
    eager = evaluate([tiny, ModelEntry(tiny, "ms-poe")], ["closedbook"], **kw)
    cont = evaluate([tiny, ModelEntry(tiny, "ms-poe")], ["closedbook"], decode="continuous", **kw)
    assert [m["decode"] for m in cont["models"]] == ["continuous", "eager"]
    assert cont["tasks"]["closedbook"]["models"] == eager["tasks"]["closedbook"]["models"]


def test_auto_batch_limits_by_device_and_memory(tiny):
    """--batch-size/--max-batch-tokens auto: CPU keeps small batches; on a GPU the token budget
    follows the free memory (capped), and given numbers are kept as they are."""
    from pear.evaluate.generate import GPU_TOKENS_CAP, batch_limits, bytes_per_token

    m = tiny.model  # 2 layers, 2 KV heads x 16 dims, fp32: 3 x 2 x 2 x 2 x 16 x 4 + MLP + hidden
    per = bytes_per_token(m)
    assert per == 3 * (2 * 2 * 2 * 16 * 4) + 2 * 96 * 4 + 4 * 64 * 4
    assert batch_limits(m) == (8, 32768)  # CPU
    assert batch_limits(m, 3, 1000) == (3, 1000)
    assert batch_limits(m, device_type="cuda", free_bytes=10 * per) == (512, 6)
    assert batch_limits(m, device_type="cuda", free_bytes=10**15) == (512, GPU_TOKENS_CAP)
    assert batch_limits(m, device_type="cuda", free_bytes=40 * per, memory_factor=4) == (512, 6)  # a variant's share
    assert batch_limits(m, memory_factor=4) == (8, 32768)  # CPU batches are sized for speed, not memory
    mib = 1 << 20
    with pytest.MonkeyPatch.context() as mp:  # a process with a quarter of an 80 MiB GPU, 4 MiB of it taken
        mp.setattr(torch.cuda, "mem_get_info", lambda d: (60 * mib, 80 * mib))
        mp.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.25)
        mp.setattr(torch.cuda, "memory_reserved", lambda d: 4 * mib)
        assert batch_limits(m, device_type="cuda")[1] == int(0.6 * 16 * mib / per) == 3024
        mp.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)  # the GPU alone
        assert batch_limits(m, device_type="cuda")[1] == int(0.6 * 60 * mib / per) == 11342
    with pytest.raises(PearError, match="--batch-size must be 'auto' or an integer"):
        evaluate([tiny], ["kv"], data_dir="/nonexistent", batch_size=0)


def test_variants_declare_their_memory_and_evaluate_sizes_batches_by_it(tiny, data_dir, monkeypatch):
    """A variant that holds several caches says so (`Variant.memory`), and the automatic batch
    limits of its entry are computed with that factor."""
    from pear.baselines import get_variant

    assert get_variant("none").memory_factor({}) == 1.0
    assert get_variant("moice").memory_factor({"routers": "init"}) == 4.0
    assert get_variant("moice").memory_factor({"routers": "init", "stack": False}) == 1.0
    assert get_variant("attention-buckets").memory_factor({}) == 6  # one run per RoPE base
    assert get_variant("attention-buckets").memory_factor({"bases": [10000, 20000]}) == 2
    assert get_variant("ms-poe").memory_factor({}) == 1.25
    seen, real = [], runner_mod.batch_limits
    monkeypatch.setattr(runner_mod, "batch_limits", lambda *a, **k: seen.append(k["memory_factor"]) or real(*a, **k))
    evaluate([tiny, ModelEntry(tiny, "attention-buckets")], ["closedbook"], data_dir=data_dir, limit=1,
             progress=False, n_resamples=10, max_new_tokens=2)
    assert seen == [1.0, 6]


def test_out_of_memory_batch_is_split_after_its_memory_is_freed():
    """A batch that runs out of GPU memory is run in halves; the failed attempt's tensors are
    released first (not kept alive by the exception's traceback during the retry)."""
    import weakref

    from pear.evaluate.generate import _split_on_oom

    done, failed = [], []

    def run(batch):
        assert all(ref() is None for ref in failed)
        if len(batch) > 2:
            activations = torch.zeros(8)  # stands for the failed batch's activations
            failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        done.extend(batch)

    _split_on_oom(run, list(range(7)))
    assert done == list(range(7)) and len(failed) == 3  # 7 -> 3 + 4 -> 3 -> 1 + 2, 4 -> 2 + 2
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _split_on_oom(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")), [0])


def test_an_option_naming_files_is_keyed_on_their_content(tiny, data_dir, tmp_path, monkeypatch):
    """MoICE's routers=DIR: routers trained again into the same folder are computed anew; the
    same routers copied elsewhere reuse their results."""
    import shutil

    from pear.baselines.moice import Routers

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path / "cache"))
    folder, copy = tmp_path / "routers", tmp_path / "copy"
    folder.mkdir()
    Routers.for_model(tiny.model, seed=1).save(folder)
    shutil.copytree(folder, copy)
    calls = []
    real = runner_mod.run_task
    monkeypatch.setattr(runner_mod, "run_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(data_dir=data_dir, limit=2, progress=False, n_resamples=100, max_new_tokens=3,
              parts_dir=tmp_path / "parts")
    run = lambda f: evaluate([ModelEntry(tiny, "moice", label="moice", options={"routers": str(f)})],
                             ["closedbook"], **kw)
    run(folder)
    run(copy)
    assert calls == [1]
    Routers.for_model(tiny.model, seed=2).save(folder)
    run(folder)
    assert calls == [1, 1]


def test_table_and_plot_when_a_model_misses_a_task(tmp_path, monkeypatch):
    """A results file assembled with --parts only can lack a model on some tasks: the table
    shows '-', the plot draws no line there, and the legend still names every model once,
    each in the same colour in every panel."""
    from pear.evaluate import report

    def acc(a):
        return {"accuracy": a, "n": 10, "correct": int(10 * a), "ci95": [a - 0.1, a + 0.1], "skipped": 0}

    both = {"a": {c: acc(0.5) for c in ("1", "2", "all")}, "b": {c: acc(0.3) for c in ("1", "2", "all")}}
    task = {"metric": "em", "kind": "generate", "positional": True, "conditions": ["1", "2", "all"], "paired": {}}
    results = {"models": [{"label": "a"}, {"label": "b"}],
               "tasks": {"t1": dict(task, models={"a": both["a"]}), "t2": dict(task, models=both)}}
    table = report.format_table(results)
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("t1")] == ["-"] * 3

    figs = []
    monkeypatch.setattr(report, "savefig", lambda fig, path, **k: figs.append(fig) or path.write_bytes(b"png"))
    report.plot_results(results, tmp_path / "p.png")
    ax1, ax2 = figs[0].axes
    assert [t.get_text() for t in ax1.get_legend().get_texts()] == ["a", "b"]
    assert len(ax1.containers) == 1 and len(ax2.containers) == 2
    assert ax1.lines[0].get_color() == ax2.lines[0].get_color() != ax2.containers[1].lines[0].get_color()


def test_markdown_table(tmp_path):
    """pear eval's .md table: accuracies, the paired difference to the first model in points with
    its bootstrap interval and McNemar p (p = 0 printed as below double precision), '–' where a
    model has no result, the rows over all conditions bold, and MMLU's macro row."""
    from pear.evaluate import report

    def acc(a):
        return {"accuracy": a, "n": 10, "correct": int(10 * a), "ci95": [a - 0.1, a + 0.1], "skipped": 0}

    def pair(d, p):
        return {"diff": d, "ci95": [d - 0.01, d + 0.01], "p_mcnemar": p, "n": 10}

    task = {"metric": "em", "kind": "generate", "positional": True, "conditions": ["1", "all"]}
    results = {"models": [{"label": "base"}, {"label": "pear"}, {"label": "x"}], "tasks": {
        "t": dict(task, models={"base": {"1": acc(0.5), "all": acc(0.4)}, "pear": {"1": acc(0.6), "all": acc(0.45)}},
                  paired={"pear": {"conditions": {"1": pair(0.1, 3.1e-05), "all": pair(0.05, 0.0)}}}),
        "mmlu": dict(task, positional=False, conditions=["all"],
                     models={"base": {"all": acc(0.3), "macro_accuracy": 0.31},
                             "pear": {"all": acc(0.25), "macro_accuracy": 0.26}},
                     paired={"pear": {"conditions": {"all": pair(-0.05, 0.25)}}})}}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.format_markdown(results).splitlines()]
    assert rows[0] == ["task", "gold pos", "base", "pear", "pear − base (points), p", "x", "x − base (points), p"]
    assert rows[2] == ["t", "1", "0.500", "0.600", "+10.0 [+9.0, +11.0], p=3.1e−5", "–", "–"]
    assert rows[3] == ["", "**all**", "**0.400**", "**0.450**", "**+5.0 [+4.0, +6.0], p<1e−300**", "**–**", "**–**"]
    assert rows[4] == ["mmlu", "**all**", "**0.300**", "**0.250**", "**−5.0 [−6.0, −4.0], p=0.25**", "**–**", "**–**"]
    assert rows[5] == ["", "macro", "0.310", "0.260", "", "–", ""]


def test_context_window_reads_every_family_attribute():
    """One definition for `pear eval` and `pear bench`: whichever attribute a config uses."""
    from types import SimpleNamespace

    from pear.evaluate.generate import WINDOW_ATTRIBUTES, context_window

    for name in WINDOW_ATTRIBUTES:
        assert context_window(SimpleNamespace(config=SimpleNamespace(**{name: 777}))) == 777
    assert context_window(SimpleNamespace(config=SimpleNamespace(hidden_size=8))) is None
    assert {"max_seq_len", "max_sequence_length", "n_positions"} <= set(WINDOW_ATTRIBUTES)


def test_static_decoding_equals_eager(tiny, data_dir):
    """`--decode static`: the static cache and the decoding step traced by torch.compile (here
    with the "eager" backend: dynamo's graph capture, no CPU code generation) give the eager
    loop's tokens, with rows stopping at different steps and batches of two shapes (one cached
    step reused, one recompiled); a variant keeps the eager loop."""
    from pear.evaluate import static_decode as sd

    ids = _ids(tiny.tokenizer) + [tiny.tokenizer("Paris is a city in").input_ids]
    stop_after = {0: 2, 1: 9, 2: 4, 3: 6}
    kw = dict(pad_id=tiny.tokenizer.pad_token_id, eos_ids={2}, max_new_tokens=10, device="cpu", batch_size=3,
              done=lambda i, new: len(new) >= stop_after[i])
    eager = greedy_generate(tiny.model, ids, **kw)
    assert [len(o) for o in eager] == [2, 9, 4, 6]
    dec = sd.StaticDecoder(tiny.model, compile=True, backend="eager", mode=None)
    assert dec.compiled and dec.step is not tiny.model
    assert sd.static_generate(tiny.model, ids, decoder=dec, **kw) == eager
    assert sd.static_generate(tiny.model, ids, **kw) == eager  # on CPU by default: the static cache, no compile
    assert dec.start[1] % sd.CACHE_BUCKET == 0

    res = evaluate([ModelEntry(tiny, label="plain"), ModelEntry(tiny, "ms-poe", label="msp")], ["mdqa-10"],
                   data_dir=data_dir, limit=1, positions="1", max_new_tokens=6, progress=False, n_resamples=10,
                   decode="static", log_samples=True)
    assert [m["decode"] for m in res["models"]] == ["static", "eager"] and res["settings"]["decode"] == "static"
    ref = evaluate([ModelEntry(tiny, label="plain")], ["mdqa-10"], data_dir=data_dir, limit=1, positions="1",
                   max_new_tokens=6, progress=False, n_resamples=10, log_samples=True)
    assert [s["output"] for s in res["samples"] if s["model"] == "plain"] == [s["output"] for s in ref["samples"]]
    with pytest.raises(PearError, match="decode must be"):
        evaluate([tiny], ["mdqa-10"], data_dir=data_dir, limit=1, decode="fast", progress=False)
    with pytest.raises(PearError, match="--decode static needs"):
        sd.StaticDecoder(strict_lm(tiny.model, []))


def test_static_decoding_compacts_rows(tiny, monkeypatch):
    """Finished rows leave the batch: once half have finished, the running rows move to a cache
    of the next power-of-two row count (here down to one row), and the answers stay the eager
    loop's (which keeps every row here)."""
    from pear.evaluate import static_decode as sd

    monkeypatch.setattr(sd, "MIN_ROWS", 1)
    tok = tiny.tokenizer
    ids = [tok(f"Item {i}: " + "word " * i).input_ids for i in range(8)]
    stop_after = [1, 2, 3, 3, 5, 6, 7, 10]
    kw = dict(pad_id=tok.pad_token_id, eos_ids={2}, max_new_tokens=12, device="cpu", batch_size=8,
              done=lambda i, new: len(new) >= stop_after[i])
    eager = greedy_generate(tiny.model, ids, compact=False, **kw)
    assert [len(o) for o in eager] == stop_after
    dec = sd.StaticDecoder(tiny.model, compile=True, backend="eager", mode=None)
    assert sd.static_generate(tiny.model, ids, decoder=dec, **kw) == eager
    assert sorted({rows for rows, _ in dec.caches}) == [1, 2, 4, 8]
    assert sd.bucket(5) == 8 and sd.bucket(8) == 8 and sd.bucket(1) == 1
    dynamic = sd.StaticDecoder(tiny.model, compile=True, backend="eager", mode=None, dynamic=True)
    assert sd.static_generate(tiny.model, ids, decoder=dynamic, **kw) == eager  # symbolic shapes from the start


def test_continuous_static_decoding_equals_eager(tiny, monkeypatch):
    """`--decode continuous-static`: prompts join the free slots of one static cache at a shared write
    column; when the cache is full the columns no running row attends to are cut from the left, and
    a joining prompt longer than the write column moves the running rows right. Every prompt's
    tokens equal the eager loop's (fp32) through joins, cuts and moves, with the step traced by
    torch.compile (backend "eager") or not, prefilled padded or packed; a variant is refused."""
    from pear.baselines import get_variant
    from pear.evaluate import continuous_static as cs
    from pear.evaluate.packed import packed_prefill

    ids, stop_after, kw = _joining_prompts(tiny.tokenizer)
    eager = greedy_generate(tiny.model, ids, **kw)
    monkeypatch.setattr(cs, "CACHE_BUCKET", 1)  # the cache just holds the longest prompt and its answer: cuts
    moves, done_counts = [], []
    real = cs._move
    monkeypatch.setattr(cs, "_move", lambda *a: moves.append(a[2:]) or real(*a))
    dec = cs.ContinuousStaticDecoder(tiny.model, compile=True, backend="eager", mode=None)
    assert dec.compiled and dec.name == "continuous-static"
    got = cs.continuous_static_generate(tiny.model, ids, decoder=dec, on_batch=done_counts.append, **kw)
    assert got == eager and [len(o) for o in got] == stop_after and sum(done_counts) == len(ids)
    assert moves and all(to < end for _, end, to in moves)  # cut from the left
    moves.clear()
    short_first = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # longer prompts join later: rows move right
    assert cs.continuous_static_generate(tiny.model, ids, batches=[short_first], **kw) == eager
    assert any(to > end for _, end, to in moves)
    mine = cs.continuous_static_generate(tiny.model, ids, batches=[[1, 4], [7]], prefill=packed_prefill, **kw)
    assert [mine[i] for i in (1, 4, 7)] == [eager[i] for i in (1, 4, 7)] and mine[0] == []
    shared = functools.partial(packed_prefill, share=True)  # the prompts are prefixes of one another
    assert cs.continuous_static_generate(tiny.model, ids, prefill=shared, **kw) == eager
    assert cs.continuous_static_generate(tiny.model, ids, **dict(kw, max_batch_tokens=60)) == eager  # two slots
    with get_variant("moice").wrap(tiny, routers="init") as lm, pytest.raises(PearError, match="continuous-static"):
        cs.ContinuousStaticDecoder(lm)


def test_continuous_static_attends_each_rows_range_through_flash(tiny, monkeypatch):
    """Where FlashAttention takes the step (`flash_decodes`; on CPU its kernel played by a reference that
    reads exactly the key rows it is pointed at), continuous-static's masks are one range of columns
    per slot through joins, cuts and right moves: the answers stay the eager loop's (fp32), with the
    step traced by dynamo and AOT autograd (the operator's fake inside the graph)."""
    from pear.evaluate import continuous_static as cs
    from pear.evaluate import step_attention as sd

    ids, stop_after, kw = _joining_prompts(tiny.tokenizer)
    eager = greedy_generate(tiny.model, ids, **kw)
    calls = []
    real = sd.flash_ranges
    monkeypatch.setattr(sd, "flash_ranges", lambda *a, **k: calls.append(1) or real(*a, kernel=_varlen_reference))
    monkeypatch.setattr(sd, "flash_decodes", lambda device, dtype: True)
    monkeypatch.setattr(sd, "FLASH_MIN_BLOCKS", 1)
    monkeypatch.setattr(cs, "CACHE_BUCKET", 1)  # cuts
    dec = cs.ContinuousStaticDecoder(tiny.model, compile=True, backend="aot_eager", mode=None)
    assert cs.continuous_static_generate(tiny.model, ids, decoder=dec, **kw) == eager and calls
    short_first = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # right moves
    assert cs.continuous_static_generate(tiny.model, ids, batches=[short_first], **kw) == eager


def test_grouped_attention_equals_repeated_heads():
    """One query token, grouped key/value heads: the group's query heads as query rows give
    what SDPA gives on keys and values repeated to every head, masked or not; a longer query
    goes to the original function untouched."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from pear.evaluate.step_attention import grouped_attention

    torch.manual_seed(0)
    B, H, Hkv, L, D = 3, 8, 2, 11, 16
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    mask = torch.rand(B, 1, 1, L) > 0.3
    mask[..., 0] = True
    module = SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True, training=False)
    attention = grouped_attention(sdpa_attention_forward)
    for m in (mask, None):
        q = torch.randn(B, H, 1, D)
        ref = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=m).transpose(1, 2)
        out, _ = attention(module, q, k, v, m, scaling=None)
        torch.testing.assert_close(out, ref)
    q = torch.randn(B, H, 4, D)
    torch.testing.assert_close(attention(module, q, k, v, None)[0], sdpa_attention_forward(module, q, k, v, None)[0])


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, seqused_k):
    """What `aten::_flash_attention_forward` computes without a causal mask, query i reading the
    `seqused_k[i]` key rows from `cu_k[i]` of k and v (rows, KVH, D), query heads grouped over them."""
    assert not causal and dropout == 0.0 and max_q >= 1 and max_k >= int(seqused_k.max())
    outs = []
    for i in range(len(cu_q) - 1):
        a, n = int(cu_k[i]), int(seqused_k[i])
        qi, ki, vi = q[int(cu_q[i]): int(cu_q[i + 1])], k[a: a + n], v[a: a + n]  # (Gq, KVH, D), (n, KVH, D)
        w = torch.einsum("gkd,nkd->kgn", qi, ki).mul(scale).softmax(-1)
        outs.append(torch.einsum("kgn,nkd->gkd", w, vi))
    return (torch.cat(outs),)


def _ranges(B, L, generator):
    end = torch.randint(1, L + 1, (B,), generator=generator)
    start = (end - torch.randint(1, L + 1, (B,), generator=generator)).clamp(min=0)
    cols = torch.arange(L)
    return start, end, (cols >= start[:, None]) & (cols < end[:, None])  # (B,), (B,), (B, L)


@pytest.mark.parametrize("B,Hkv,G,L", [(3, 2, 4, 11), (5, 1, 3, 7), (2, 3, 1, 9)])
def test_flash_ranges_reads_each_rows_range_in_place(B, Hkv, G, L):
    """The continuous-static step's FlashAttention call: the cache viewed as one sequence of key
    rows, each row's range addressed at its own offset with its own length, a group's query heads as
    query tokens: the same output as SDPA over the repeated heads with the range as mask (the
    kernel played by a reference that reads exactly the rows it is pointed at)."""
    import torch.nn.functional as F

    from pear.evaluate.step_attention import flash_ranges

    g = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, Hkv * G, 1, 16, generator=g)
    k, v = torch.randn(B, Hkv, L, 16, generator=g), torch.randn(B, Hkv, L, 16, generator=g)
    start, end, mask = _ranges(B, L, g)
    out = flash_ranges(q, k, v, start, end, 0.25, kernel=_varlen_reference)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                         attn_mask=mask[:, None, None, :], scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_range_attention_takes_each_rows_range_from_its_mask(monkeypatch):
    """`range_attention` finds each row's first and last attended column from a boolean or additive
    mask and hands the range to FlashAttention (its stand-in here); a longer query, no mask or too
    few rows x heads keep grouped SDPA; the operator's fake gives torch.compile the output shape."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from pear.evaluate import step_attention as sd

    calls = []
    monkeypatch.setattr(sd, "flash_ranges_op", lambda *a: calls.append(a) or sd.flash_ranges(
        *a, kernel=_varlen_reference))
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, L, D = 4, 2, 3, 13, 16
    module = SimpleNamespace(num_key_value_groups=G, is_causal=True, training=False)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    _, _, mask = _ranges(B, L, g)
    additive = torch.zeros(B, 1, 1, L).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(q, repeat_kv(k, G), repeat_kv(v, G), attn_mask=mask[:, None, None, :])
    ref = ref.transpose(1, 2)  # (B, 1, H, D)
    monkeypatch.setattr(sd, "FLASH_MIN_BLOCKS", B * Hkv)
    attention = sd.range_attention(sdpa_attention_forward)
    for m in (mask[:, None, None, :], additive):
        torch.testing.assert_close(attention(module, q, k, v, m)[0], ref)
    assert len(calls) == 2
    monkeypatch.setattr(sd, "FLASH_MIN_BLOCKS", B * Hkv + 1)  # too little work: grouped SDPA
    torch.testing.assert_close(attention(module, q, k, v, mask[:, None, None, :])[0], ref)
    q4 = torch.randn(B, Hkv * G, 4, D, generator=g)
    torch.testing.assert_close(attention(module, q4, k, v, None)[0], sdpa_attention_forward(module, q4, k, v, None)[0])
    assert len(calls) == 2
    with FakeTensorMode():
        fake = torch.ops.pear.flash_ranges(torch.empty(B, Hkv * G, 1, D), torch.empty(B, Hkv, L, D),
                                           torch.empty(B, Hkv, L, D), torch.zeros(B, dtype=torch.long),
                                           torch.ones(B, dtype=torch.long), 0.25)
    assert fake.shape == (B, 1, Hkv * G, D)
    assert not sd.flash_decodes("cpu", torch.float32)  # CPU keeps SDPA


@pytest.mark.parametrize("decode,prefill", [("static", "padded"), ("continuous", "padded"), ("eager", "packed"),
                                            ("continuous", "packed"), ("continuous", "compiled"),
                                            ("continuous-static", "packed"), ("eager", "packed-shared"),
                                            ("continuous-static", "compiled-shared")])
def test_cli_decode(tiny, data_dir, tmp_path, decode, prefill):
    from pear.cli import main

    folder = tmp_path / "tiny"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(folder), "--task", "closedbook", "--limit", "2", "--data-dir", str(data_dir),
            "--device", "cpu", "--out", str(out), "--no-progress", "--bootstrap", "10", "--max-new-tokens", "4",
            "--parts-dir", str(tmp_path / "parts"), "--log-samples"]

    def outputs():
        with gzip.open(out.with_name("eval.samples.jsonl.gz"), "rt") as f:
            return [json.loads(line)["output"] for line in f]

    asked = ["--decode", decode] + (["--prefill", prefill] if prefill != "padded" else [])
    assert main(args + asked) == 0
    res, got = json.loads(out.read_text()), outputs()
    assert (res["models"][0]["decode"], res["models"][0]["prefill"]) == (decode, prefill)
    said = [f"--decode {decode}"] * (decode != "eager") + [f"--prefill {prefill}"] * (prefill != "padded")
    assert said and all(x in res["settings"]["command"] for x in said)
    assert main(args + ["--force"]) == 0  # eager: parts of its own, keyed on the decoding
    assert len(list((tmp_path / "parts").iterdir())) == 2
    assert len(got) == 2 and got == outputs()  # the eager loop's outputs (fp32)


def test_done_is_asked_only_at_tokens_that_can_end_the_answer(tiny, data_dir, monkeypatch):
    """A QA answer is done at its first newline, which comes with a token whose own text holds one
    (SmolLM2's byte-level BPE; random sequences mixing newline tokens, pieces of multi-byte characters
    and special tokens): `done` is asked only there, and the answers are those of asking it at every token."""
    import random

    from pear.evaluate import scoring
    from pear.evaluate.metrics import qa_done
    from pear.evaluate.tasks import closedbook

    tok = tiny.tokenizer
    gate = scoring.tokens_holding(tok, "\n")
    newline = tok.convert_tokens_to_ids("Ċ")
    assert newline in gate and scoring.tokens_holding(tok, "\n") is gate
    rng = random.Random(0)
    pieces = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]  # parts of multi-byte characters
    pools = (sorted(gate), pieces, list(range(len(tok))), sorted(tok.all_special_ids))
    for _ in range(300):
        seq = [rng.choice(pools[rng.choices(range(4), weights=[1, 3, 8, 1])[0]]) for _ in range(rng.randint(1, 30))]
        for n in range(1, len(seq) + 1):
            assert qa_done(tok.decode(seq[:n], skip_special_tokens=True)) == any(t in gate for t in seq[:n])

    # the harness: a model that ends some answers with a newline after a few tokens
    head = tiny.model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[newline] = 0.6
    hook = head.register_forward_hook(lambda m, i, out: out + bias.to(out.dtype))
    asked, runs = [0], {}
    monkeypatch.setattr(closedbook, "qa_done", lambda out: asked.__setitem__(0, asked[0] + 1) or qa_done(out))
    try:
        for name, holding in (("gated", scoring.tokens_holding), ("every token", lambda t, c: frozenset(range(len(t))))):
            monkeypatch.setattr(scoring, "tokens_holding", holding)
            asked[0] = 0
            res = evaluate([ModelEntry(tiny, label="m")], ["closedbook"], data_dir=data_dir, limit=6, progress=False,
                           n_resamples=10, max_new_tokens=12, log_samples=True)
            runs[name] = ([s["output"] for s in res["samples"]], asked[0])
    finally:
        hook.remove()
    outs = runs["gated"][0]
    assert outs == runs["every token"][0]
    assert any("\n" in o for o in outs) and any("\n" not in o for o in outs)  # some stopped at a newline, some ran on
    assert 0 < runs["gated"][1] < runs["every token"][1]


def test_done_gate_stops_where_done_does_with_byte_fallback():
    """A SentencePiece-style vocabulary with byte fallback (as Gemma's): a newline byte inside an invalid
    byte sequence decodes to replacement characters, so a token holding a newline may bring none; `done`
    is then asked once more for nothing, and every answer still stops at the step where `done` asked at
    every token stops it."""
    import random

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from pear.evaluate.metrics import qa_done
    from pear.evaluate.scoring import tokens_holding

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁the", "▁cat", "\n", "\n\n", "a", "b", "▁", ".\n", "é"]:
        vocab[piece] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    gate = tokens_holding(tok, "\n")
    assert set(tok.convert_ids_to_tokens(sorted(gate))) == {"\n", "\n\n", ".\n", "<0x0A>"}
    assert tok.decode([vocab["<0xE3>"], vocab["<0x0A>"]]) == "\ufffd\ufffd"  # the newline lost in an invalid sequence
    rng, lost = random.Random(0), 0
    some_bytes = [vocab[f"<0x{b:02X}>"] for b in (0x0A, 0xE3, 0x81, 0x82, 0xC3, 0xA9)]
    for _ in range(2000):
        seq = [rng.randrange(len(tok)) if rng.random() < 0.5 else rng.choice(some_bytes) for _ in range(rng.randint(1, 12))]
        done = [qa_done(tok.decode(seq[:n], skip_special_tokens=True)) for n in range(1, len(seq) + 1)]
        every = next((n for n, d in enumerate(done) if d), None)
        gated = next((n for n, d in enumerate(done) if d and seq[n] in gate), None)
        assert gated == every
        lost += any(t in gate for t in seq) and not done[-1]
    assert lost  # the case above happened


def test_eval_cli_offers_exactly_the_runners_decoders_and_prefills():
    """`pear eval --decode/--prefill` list their choices without importing the runner (a fast --help); they must
    stay the runner's own (`runner.DECODES`, `runner.PREFILLS`), the one home of those names."""
    from pear.cli import build_parser
    from pear.evaluate.runner import DECODES, PREFILLS

    parser = build_parser(["eval"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.dest in ("decode", "prefill")}
    assert choices == {"decode": DECODES, "prefill": PREFILLS}
