"""`pear bench overhead` on tiny models saved to disk (a base folder and a PEAR-folded folder)."""

import json

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import pear
from pear.bench import METRICS, VARIANTS, format_table, overhead
from pear.cli import main


def _save_pair(tmp_path, model):
    base, folded = tmp_path / "base", tmp_path / "pear"
    model.save_pretrained(base)
    pear.fold(model, {(0, 1): 0.5, (model.config.num_hidden_layers - 1, 0): 0.8})
    model.save_pretrained(folded)
    return str(base), str(folded)


def _tiny_llama(layers=3):
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                               **dict(CONFIGS["llama"], num_hidden_layers=layers))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_bench_overhead_cli_reports_every_variant(tmp_path, capsys):
    base, folded = _save_pair(tmp_path, _tiny_llama())  # 3 layers: Ms-PoE acts on layer 2
    out = tmp_path / "res" / "bench.json"
    rc = main(["bench", "overhead", "--model", base, "--pear", folded, "--context", "24", "--new-tokens", "3",
               "--trials", "2", "--warmup", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["variants"]) == list(VARIANTS)
    assert res["pear_checkpoint"]["same_architecture"] and res["not_applicable"] == {}
    for v, r in res["variants"].items():
        for m in METRICS:
            assert len(r[m]["trials"]) == 2 and r[m]["median"] > 0
            assert r["ratio_to_base"][m]["median"] > 0
    assert all(r["median"] == 1.0 for r in res["variants"]["base"]["ratio_to_base"].values())
    v = list(VARIANTS)  # each round starts one variant later: no variant is stuck in one slot
    assert res["settings"]["order_per_trial"] == [v, v[1:] + v[:1]]
    assert res["memory_method"] == "cpu_peak_rss"  # Linux: peak RSS, reset per trial
    weights = res["weights_bytes"]["base"]
    assert weights == res["weights_bytes"]["pear"]
    assert all(r["peak_memory_bytes"]["min"] >= weights for r in res["variants"].values())
    printed = capsys.readouterr().out
    for v in VARIANTS:
        assert v in printed
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_bench_moice_both_ways(tmp_path, monkeypatch):
    """moice-one-by-one, on request: MoICE with its experts one after another, the same routers."""
    import pear.baselines.moice as moice_mod

    seen = []
    real = moice_mod.MoICE._stacked
    monkeypatch.setattr(moice_mod.MoICE, "_stacked", lambda self, *a, **k: seen.append(1) or real(self, *a, **k))
    base, folded = _save_pair(tmp_path, _tiny_llama())
    res = overhead(base, folded, context=16, new_tokens=2, trials=1, warmup=0, device="cpu",
                   variants=["base", "moice-one-by-one"])
    assert list(res["variants"]) == ["base", "moice-one-by-one"] and not seen
    assert res["settings"]["variant_options"] == {"base": {}, "moice-one-by-one": {"routers": "init", "stack": False}}
    overhead(base, folded, context=16, new_tokens=2, trials=1, warmup=0, device="cpu", variants=["moice"])
    assert seen


def test_bench_skips_baselines_that_do_not_apply(tmp_path):
    base, folded = _save_pair(tmp_path, tiny_model("gpt2"))
    res = overhead(base, folded, context=16, new_tokens=2, trials=1, warmup=0, device="cpu")
    assert set(res["variants"]) == {"base", "pear"}
    assert "not applicable to gpt2" in res["not_applicable"]["ms-poe"]
    assert "not applicable to gpt2" in res["not_applicable"]["attention-buckets"]
    assert "not applicable to gpt2" in res["not_applicable"]["moice"]
    assert "not applicable" in format_table(res)


def test_bench_refuses_a_different_architecture(tmp_path, capsys):
    base = tmp_path / "base"
    _tiny_llama(layers=3).save_pretrained(base)
    other = tmp_path / "other"
    _tiny_llama(layers=2).save_pretrained(other)
    out = tmp_path / "bench.json"
    rc = main(["bench", "overhead", "--model", str(base), "--pear", str(other), "--context", "8",
               "--new-tokens", "1", "--trials", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "not the base model's architecture" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [(["--context", "100000"], "context window"), (["--trials", "0"], ">= 1")])
def test_bench_bad_settings(tmp_path, capsys, args, msg):
    base, folded = _save_pair(tmp_path, _tiny_llama(layers=2))
    rc = main(["bench", "overhead", "--model", base, "--pear", folded, "--device", "cpu",
               "--out", str(tmp_path / "b.json"), *args])
    assert rc == 2 and msg in capsys.readouterr().err
