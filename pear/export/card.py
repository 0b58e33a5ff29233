"""The model card (README.md) of every output: a folder pushed to a hub describes itself.

Front matter as the Hugging Face Hub reads it: ``base_model`` (a hub id, when the base has
one), ``base_model_relation`` (``adapter`` for the PEFT adapter, ``finetune`` for changed
weights: the HF folder and the GGUF file), ``library_name``, tags. Body: how to load it, the
recipe (from `pear run`'s settings when there are any), the coefficients, the measured effect
(held-out copying task, from the same numbers as report.md) and the checks made before saving.
"""

from __future__ import annotations

from typing import Mapping

from . import gguf_file

RELATION = {"hf": "finetune", "gguf": "finetune", "peft": "adapter"}
LIBRARY = {"hf": "transformers", "gguf": None, "peft": "peft"}
TAGS = {"hf": [], "gguf": ["gguf"], "peft": ["ia3"]}


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf")


def _load_text(fmt: str, files: Mapping[str, str], base: str, site: str = "output") -> str:
    if fmt == "gguf":
        f = files.get("gguf", "model.gguf")
        return (f"A GGUF file for llama.cpp, Ollama and LM Studio, the base GGUF with its attention output "
                f"tensors re-weighted:\n\n```bash\nllama-cli -m {f} -p \"...\"\n"
                f"# Ollama: a Modelfile with the line  FROM ./{f}\n```\n\n"
                f"transformers reads it too: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{f}\")`.")
    if fmt == "peft":
        where = ("output channel of the query projection (the heads' queries, bias included)" if site == "query"
                 else "input channel of the attention output projection")
        return (f"A PEFT IA3 adapter: one scale per {where}, "
                "switched on and off at run time:\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
                "from peft import PeftModel\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n"
                "with model.disable_adapter():   # the base model\n    ...\n"
                "merged = model.merge_and_unload()   # the same weights as `pear fold`\n```")
    return ("An ordinary checkpoint: architecture, parameter count, speed and memory are those of the base "
            "model.\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```")


def _recipe(meta: Mapping) -> str:
    run = meta.get("pear_run")
    if not run:
        return ("Coefficients given to `pear fold` (learned beforehand with `pear fit` on pear's synthetic "
                "copying task, every model weight frozen).")
    fs = run.get("fit_settings", {})
    keys = ["steps", "batch", "length", "lr", "seed"]
    keys += ["objective", "objective_options", "scales", "penalty", "anchor"]
    fit = ", ".join(f"{k} {fs[k]}" for k in keys if k in fs)
    if run.get("method") is None:  # every head scaled: no discovery
        chosen = f"every head scaled ({run.get('scales')}, {run.get('granularity')} scales)"
    else:
        chosen = (f"heads found by `{run.get('method')}` discovery (mean ablation on the copying task), "
                  f"K = {run.get('k')} chosen by `{run.get('k_selection')}`")
    return (f"`pear run`, recipe `{run.get('recipe')}`: {chosen}; learned with every model weight frozen "
            f"(bounds `{run.get('bounds')}`; {fit}; compute dtype {run.get('compute_dtype')}).")


def _effect(meta: Mapping) -> str:
    hp = (meta.get("pear_run") or {}).get("heldout_proxy")
    if not hp:
        return "Not measured by `pear fold`; `pear run` measures it on a held-out copying batch (report.md)."
    b, f = hp["base"], hp["folded"]
    return ("Held-out copying task, on the saved weights (the same numbers as report.md):\n\n"
            "| | base | re-weighted |\n|---|---:|---:|\n"
            f"| proxy loss | {b['proxy_loss']:.4f} | {f['proxy_loss']:.4f} |\n"
            f"| copy accuracy | {b['copy_accuracy']:.4f} | {f['copy_accuracy']:.4f} |")


def _checks(checks: Mapping[str, Mapping]) -> str:
    lines = [f"- {name}: max |Δ logit| {c['max_abs_logit_diff']:.3g} (tolerance {c['tolerance']:.3g}), "
             f"argmax agreement {c.get('argmax_agreement', float('nan')):.3f}" for name, c in checks.items()]
    return "\n".join(lines)


def _coef_text(a) -> str:
    """A per-head scale, or a per-channel coefficient summarised by its mean and range."""
    if isinstance(a, (list, tuple)):
        return f"{sum(a) / len(a):.4f} (mean of {len(a)} channels, {min(a):.3f}..{max(a):.3f})"
    return f"{a:.4f}"


def model_card(fmt: str, base: str, heads: list[dict], arch, meta: Mapping, checks: Mapping[str, Mapping],
               files: Mapping[str, str] | None = None) -> str:
    """README.md text. heads: [{"layer", "head", "coefficient"}]; meta: pear.json's content;
    checks: name -> verification dict (max_abs_logit_diff, tolerance, argmax_agreement)."""
    from .. import __version__

    front = []
    if _looks_like_hub_id(base):
        front += [f"base_model: {base}", f"base_model_relation: {RELATION[fmt]}"]
    if LIBRARY[fmt]:
        front.append(f"library_name: {LIBRARY[fmt]}")
    front += ["tags:"] + [f"- {t}" for t in ["pear", "attention-reweighting", *TAGS[fmt]]]
    rows = "\n".join(f"| {h['layer']} | {h['head']} | {_coef_text(h['coefficient'])} |" for h in heads)
    site = meta.get("site", "output")
    stored = meta.get("gguf", {}).get(gguf_file.types_key(site))
    note = ""
    src = meta.get("base_model_file")
    if src:  # the weights are that file's, not the hub checkpoint's
        note += (f"\nThe base weights are `{src['file']}` ({src['quantisation']} quantisation, sha256 "
                 f"`{src['sha256']}`), dequantised to {src['dequantised_to']}: this is that file's model, "
                 f"not the original {base} weights.\n")
    if stored:
        kinds = sorted({f"{s['original']} -> {s['written']}" for s in stored.values()})
        note = f"\nScaled {gguf_file.SCALED_TENSORS[site]} tensors stored as: {', '.join(kinds)}.\n"
    scaled = "queries" if site == "query" else "output"
    return f"""---
{chr(10).join(front)}
---

# {base}, re-weighted with PEAR

{len(heads)} of the {arch.n_total_heads} attention heads of this `{arch.model_type}` model have their {scaled}
scaled by a learned coefficient (PEAR, arXiv 2409.19745: heads that suppress copying from the
context are found and re-weighted so the model reads its context better).

## Load

{_load_text(fmt, files or {}, base, site)}

## Recipe

{_recipe(meta)}

## Re-weighted heads

| layer | head | coefficient |
|---:|---:|---:|
{rows}

## Measured effect

{_effect(meta)}

## Checks before saving

{_checks(checks)}
{note}
Made with pear {__version__}; details in `pear.json`.
"""
