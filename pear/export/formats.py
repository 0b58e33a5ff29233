"""`--format gguf|peft`: save a re-weighting as a GGUF file or a PEFT adapter, verified, atomically.

Each output is a folder, like the HF checkpoint: the artefact (``<base>.pear.gguf``, or
``adapter_config.json`` + ``adapter_model.safetensors``), ``pear.json`` and a model card. The
folder is built in a temporary sibling and renamed into place only after the check passed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import torch

from ..atomic import json_text
from ..folding.checkpoint import HUB_IDS, AtomicDir, check_out_dir, verification_input
from ..errors import PearError
from ..families import resolve
from ..loading import LoadedModel, resolve_spec
from ..folding.coefficients import HeadKey, check_coefficients, check_site, coefficients_json
from . import gguf_file, peft_adapter
from .card import model_card
from .scales import FORMATS, channel_scales, check_channel_scales, scales_json

NEEDS_GGUF = ("--format gguf writes the base GGUF file with re-weighted attention tensors, so it needs a "
              "GGUF base model (a .gguf file, or a preset such as smollm2-135m). No maintained Hugging Face to "
              "GGUF converter installs from PyPI: convert the folder with llama.cpp's convert_hf_to_gguf.py, then "
              "pass the .gguf as --model")


def check_format(fmt: str, spec, site: str = "output") -> None:
    """Refuse an impossible --format before any expensive work."""
    if fmt not in FORMATS:
        raise PearError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    check_site(site)
    if fmt == "gguf" and not resolve_spec(spec).gguf_file:
        raise PearError(f"{spec}: {NEEDS_GGUF}")
    if fmt == "peft":
        peft_adapter._peft()


def base_name(loaded: LoadedModel) -> str:
    return HUB_IDS.get(loaded.spec.spec, loaded.spec.spec)


def _meta(loaded: LoadedModel, fmt: str, coefs, scales, checks: dict, extra: dict | None, site: str) -> dict:
    from .. import __version__

    arch = resolve(loaded.model)
    return {"pear_version": __version__, "format": fmt, "base_model": loaded.spec.spec,
            "base_model_kind": loaded.spec.kind, "model_type": arch.model_type, "site": site,
            "heads": coefficients_json(coefs)["heads"], "channel_scales": scales_json(scales, arch),
            "verification": checks, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}


def _with_fold_check(extra: dict | None, verification) -> dict:
    """pear.json's record of the fold check (folded vs hooked logits), when one was made."""
    if verification is None:
        return dict(extra or {})
    return {"fold_verification": verification.as_dict(), **(extra or {})}


def _prepare(loaded: LoadedModel, coefs: Mapping[HeadKey, float], scales, site: str):
    arch = resolve(loaded.model)
    arch.site_projs(check_site(site))  # a site this model cannot scale is refused before anything is written
    coefs = check_coefficients(arch, coefs)
    scales = check_channel_scales(arch, channel_scales(arch, coefs) if scales is None else scales)
    return arch, coefs, scales


def save_gguf(loaded: LoadedModel, coefs: Mapping[HeadKey, float], out: str | Path, *, verification=None,
              force: bool = False, extra: dict | None = None, scales: Mapping[int, torch.Tensor] | None = None,
              site: str = "output") -> tuple[Path, dict]:
    """`loaded` is the base GGUF model, already folded (the reference). Writes
    out/<base>.pear.gguf (+ pear.json, README.md); verified against `loaded`'s logits."""
    check_out_dir(out, force)
    ms = loaded.spec
    if not ms.gguf_file:
        raise PearError(f"{ms.spec}: {NEEDS_GGUF}")
    arch, coefs, scales = _prepare(loaded, coefs, scales, site)
    extra = _with_fold_check(extra, verification)
    base = Path(ms.path) / ms.gguf_file
    digest = gguf_file.sha256(base)
    name = f"{Path(ms.gguf_file).stem}.pear.gguf"
    from .. import __version__

    kv = {"pear.version": __version__, "pear.base_file": base.name, "pear.base_sha256": digest,
          "pear.coefficients": json.dumps(coefficients_json(coefs)["heads"]),
          "pear.channel_scales": json.dumps(scales_json(scales, arch))}
    with AtomicDir(out, force) as tmp:
        stored = gguf_file.write_gguf(base, scales, tmp / name, kv, site)
        check = gguf_file.verify(tmp / name, loaded.model, verification_input(loaded.model),
                                 gguf_file.tolerance_for(stored))
        meta = _meta(loaded, "gguf", coefs, scales, {"gguf_vs_folded": check}, extra, site)
        meta["gguf"] = {"file": name, "base_file": base.name, "base_sha256": digest, gguf_file.types_key(site): stored}
        (tmp / "pear.json").write_text(json_text(meta) + "\n")
        (tmp / "README.md").write_text(model_card("gguf", base_name(loaded), meta["heads"], arch, meta,
                                                  meta["verification"], {"gguf": name}))
    return Path(out) / name, {"stored": stored, **check}


def save_peft(loaded: LoadedModel, coefs: Mapping[HeadKey, float], out: str | Path, *, verification=None,
              force: bool = False, extra: dict | None = None, scales: Mapping[int, torch.Tensor] | None = None,
              site: str = "output") -> tuple[Path, dict]:
    """`loaded` is the *unfolded* base model (left as it was). Writes an IA3 adapter folder,
    checked by loading it back with `PeftModel.from_pretrained` against the hooked scales."""
    check_out_dir(out, force)
    arch, coefs, scales = _prepare(loaded, coefs, scales, site)
    extra = _with_fold_check(extra, verification)
    with AtomicDir(out, force) as tmp:
        peft_adapter.write_adapter(loaded.model, scales, tmp, base_name(loaded), site)
        check = peft_adapter.verify_adapter(loaded.model, scales, tmp, verification_input(loaded.model), site)
        meta = _meta(loaded, "peft", coefs, scales, {"adapter_vs_hooked": check}, extra, site)
        (tmp / "pear.json").write_text(json_text(meta) + "\n")
        (tmp / "README.md").write_text(model_card("peft", base_name(loaded), meta["heads"], arch, meta,
                                                  meta["verification"]))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return Path(out), check


def fold_to_format(args, coefs: Mapping[HeadKey, float], site: str = "output") -> int:
    """`pear fold --format gguf|peft`: load, (fold and check,) save, print one line."""
    from ..folding import verify_fold
    from ..loading import load_model

    check_format(args.format, args.model, site)
    if args.format == "gguf" and args.dtype not in ("auto", "fp32"):
        raise PearError("--format gguf compares the written file with the folded model in fp32; leave --dtype auto")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    if args.format == "gguf":
        fold_check = verify_fold(loaded.model, check_coefficients(resolve(loaded.model), coefs), args.tolerance,
                                 site=site)
        path, v = save_gguf(loaded, coefs, args.out, verification=fold_check, force=args.force, site=site)
        kinds = sorted({f"{s['original']}->{s['written']}" for s in v["stored"].values()})
        print(f"wrote {path}: {len(v['stored'])} {gguf_file.SCALED_TENSORS[site]} tensors re-weighted "
              f"({', '.join(kinds)}); "
              f"max |GGUF - folded| logit diff {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:.3g})")
    else:
        path, v = save_peft(loaded, coefs, args.out, force=args.force, site=site)
        print(f"wrote IA3 adapter {path} ({len(coefs)} heads{', their queries' if site == 'query' else ''}); "
              f"max |adapter - hooked| logit diff "
              f"{v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:.3g})")
    return 0
