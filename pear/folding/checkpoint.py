"""Fold, verify, save: turn head coefficients into an ordinary Hugging Face checkpoint.

`fold_and_save` is the whole step: hooked logits on a fixed input, fold the scales into
the weights, folded logits on the same input, refuse to save if they differ by more than
a tolerance, then write the folder atomically (temporary folder, then rename). The saved
folder loads with plain ``AutoModelForCausalLM.from_pretrained``; `pear.json` beside the
weights records where it came from.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..atomic import atomic_dir, json_text
from ..dtypes import dtype_name
from ..errors import PearError
from ..families import resolve
from ..hardware import on_one_device
from ..loading import LoadedModel, load_model, strip_quantization
from .coefficients import HeadKey, check_coefficients, coefficients_json
from .scaling import HeadScaling, fold, head_views

# Accepted max |folded - hooked| logit difference, relative to max |logit|, per weight dtype.
# fp32 differences are rounding (~1e-6 relative, measured on SmolLM2-135M); in 16-bit both
# runs round activations and the folded weight is rounded once more, so differences of a few
# ulps of the largest logit are expected (bf16: ~0.5 on logits of ~34, i.e. 1.5 %, with 11
# heads scaled; 1.03, i.e. 3.1 %, with every one of SmolLM2's 270 heads scaled).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 5e-3}
# 16-bit weights are checked in fp32 arithmetic where the model is on one device: in 16-bit
# the activations' own rounding, over many scaled heads, can exceed any useful tolerance
# (Gemma-3-270M, bf16, every head scaled: 9.5 on logits of 136) and would hide whether the fold
# is right. In fp32, folded and hooked differ only by the folded weights' one rounding to 16
# bits, as they are saved: 0.16-0.36 % of the largest logit in bf16 with every head scaled
# (SmolLM2-135M, Gemma-3-270M, fitted coefficients of ±17 %).
FP32_CHECK_TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def verification_input(model, batch: int = 2, length: int = 48, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded batch of token ids used to compare hooked and folded logits."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@dataclass
class Verification:
    max_abs_diff: float
    tolerance: float
    logits_max_abs: float
    argmax_agreement: float
    compute_dtype: str = ""  # the arithmetic of the check: fp32 for 16-bit weights on one device

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {"max_abs_logit_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "logits_max_abs": self.logits_max_abs, "argmax_agreement": self.argmax_agreement,
                "compute_dtype": self.compute_dtype}


def _dtypes(model) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _restore(model, dtypes: dict[str, torch.dtype]) -> None:
    """Every parameter and buffer back to its recorded dtype (RoPE tables stay fp32 in a bf16
    model: a blanket `model.to(bf16)` would round them too)."""
    for name, p in model.named_parameters():
        if p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    for name, b in list(model.named_buffers()):
        if b.dtype != dtypes[name]:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(dtypes[name])


@torch.no_grad()
def verify_fold(model, coefs: Mapping[HeadKey, float], tolerance: float | None = None,
                input_ids: torch.Tensor | None = None, site: str = "output") -> Verification:
    """Fold `coefs` into `model` in place and check folded logits equal hooked logits.

    A 16-bit model on one device is compared in fp32 arithmetic (FP32_CHECK_TOLERANCE), its
    folded weights rounded to 16 bits as they are saved; it is left in its own dtypes.
    Raises PearError, the model's weights as they were, if the difference exceeds `tolerance`.
    """
    dtype = next(model.parameters()).dtype
    in_fp32 = dtype in FP32_CHECK_TOLERANCE and on_one_device(model)
    dtypes = _dtypes(model)
    arch = resolve(model)
    check_coefficients(arch, coefs)  # (head_views refuses a site this model cannot scale)
    kept = {k: [w.detach().to("cpu", copy=True) for w, _ in head_views(arch, *k, site)]  # what the fold writes,
            for k in coefs}  # the scaled heads' slices alone, in host memory: a large model's GPU has no room to spare
    ids = (verification_input(model) if input_ids is None else input_ids).to(model.device)
    try:
        if in_fp32:
            model.float()
        with HeadScaling(model, coefs, trainable=False, site=site):
            hooked = model(ids, use_cache=False).logits.float()
        fold(model, coefs, site)
        if in_fp32:
            unrounded = model(ids, use_cache=False).logits.float()  # the folded weights before their rounding
            _restore(model, dtypes)  # the folded weights rounded to 16 bits, as saved
            model.float()
        folded = model(ids, use_cache=False).logits.float()
    finally:
        _restore(model, dtypes)
    scale = max(1.0, float(hooked.abs().max()))
    rel = (FP32_CHECK_TOLERANCE if in_fp32 else RELATIVE_TOLERANCE).get(dtype, 1e-4)
    tol = rel * scale if tolerance is None else tolerance
    v = Verification(
        max_abs_diff=float((folded - hooked).abs().max()),
        tolerance=float(tol),
        logits_max_abs=scale,
        argmax_agreement=float((folded.argmax(-1) == hooked.argmax(-1)).float().mean()),
        compute_dtype=dtype_name(torch.float32 if in_fp32 else dtype),
    )
    if not v.ok:
        for k, olds in kept.items():  # exactly (unfolding 16-bit weights would round them once more)
            for (w, _), old in zip(head_views(arch, *k, site), olds):  # views taken again: dtype moves re-allocate
                w.copy_(old)
        why = ""
        if in_fp32:  # in fp32 arithmetic a right fold differs only by its weights' rounding: which one?
            off = float((unrounded - hooked).abs().max())
            why = (f"; what is left is the scaled weights' rounding to {dtype_name(dtype)} (fp32 weights avoid it: "
                   f"pear run --save-dtype fp32, pear fold --dtype fp32)"
                   if off <= RELATIVE_TOLERANCE[torch.float32] * scale else
                   f"; the scales leave the model numerically fragile: with fp32 weights, not rounded, the "
                   f"logits already move by {off:.3g}")
        raise PearError(f"fold verification failed: folded logits differ from hooked logits by "
                        f"{v.max_abs_diff:.3g} > tolerance {tol:.3g}; nothing saved{why}")
    return v


# ---------------------------------------------------------------------------- output folder
def check_out_dir(out: str | Path, force: bool) -> Path:
    """Refuse a non-empty output folder unless `force`; call before any expensive work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PearError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PearError(f"output folder {out} exists and is not empty; pass --force to overwrite")
    return out


def AtomicDir(out: str | Path, force: bool = False):
    """Write into a temporary sibling folder; on success rename it to `out` (replacing it).
    Refuses a non-empty `out` unless `force` (`check_out_dir`) before anything is written."""
    return atomic_dir(check_out_dir(out, force))


def base_file_info(spec) -> dict | None:
    """Which exact file the base weights came from, for a GGUF spec: name, quantisation type,
    size, sha256 (the hub id alone does not say that the weights are a dequantised Q4_1, say).
    Cached beside the converted copy, keyed like it by the file's size and mtime."""
    if not spec.gguf_file:
        return None
    from ..atomic import write_text
    from ..loading import converted_folder
    from ..preflight import gguf_metadata

    f = Path(spec.path) / spec.gguf_file
    cache = converted_folder(f).with_name(converted_folder(f).name + ".source.json")
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    meta = gguf_metadata(f)
    info = {"file": f.name, "format": "gguf", "quantisation": meta["file_type"], "size": f.stat().st_size,
            "sha256": h.hexdigest(), "dequantised_to": "float32"}
    try:
        write_text(cache, json.dumps(info, indent=2) + "\n")
    except OSError:
        pass
    return info


HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


def save_checkpoint(loaded: LoadedModel, coefs: Mapping[HeadKey, float], out: str | Path, *,
                    verification: Verification, force: bool = False, extra: dict | None = None,
                    site: str = "output") -> Path:
    """Save an already folded model as a Hugging Face folder with pear.json and a model card."""
    from .. import __version__
    from ..export.card import model_card

    model, tokenizer = loaded.model, loaded.tokenizer
    arch = resolve(model)
    strip_quantization(model)
    meta = {
        "pear_version": __version__,
        "base_model": loaded.spec.spec,
        "base_model_kind": loaded.spec.kind,
        "base_model_hub_id": HUB_IDS.get(loaded.spec.spec),
        "base_model_file": base_file_info(loaded.spec),
        "model_type": arch.model_type,
        "dtype": dtype_name(model),
        "site": site,
        "heads": coefficients_json(coefs, site)["heads"],
        "verification": verification.as_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    with AtomicDir(out, force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "pear.json").write_text(json_text(meta) + "\n")
        base = HUB_IDS.get(loaded.spec.spec, loaded.spec.spec)
        (tmp / "README.md").write_text(model_card("hf", base, meta["heads"], arch, meta,
                                                  {"folded_vs_hooked": meta["verification"]}))
    return Path(out)


def fold_and_save(model: str | LoadedModel | None, coefs: Mapping[HeadKey, float], out: str | Path, *,
                  force: bool = False, tolerance: float | None = None, extra: dict | None = None,
                  site: str = "output", **load_kwargs) -> tuple[Path, Verification]:
    """Load (if given a spec), fold, verify, save. The input model files are never written."""
    check_out_dir(out, force)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_kwargs)
    coefs = check_coefficients(resolve(loaded.model), coefs)
    v = verify_fold(loaded.model, coefs, tolerance, site=site)
    return save_checkpoint(loaded, coefs, out, verification=v, force=force, extra=extra, site=site), v
