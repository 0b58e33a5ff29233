"""`pear bench overhead`: what each way of helping a model read its context costs at inference.

Five variants in one process and one run: the base model, the PEAR-folded checkpoint (loaded
as an ordinary model), Ms-PoE, Attention Buckets and MoICE (pear.baselines, on the base model;
MoICE with untrained routers unless --moice-routers DIR: its cost does not depend on their
values). Trials are interleaved, each round in a rotated order (base, pear, ms-poe, buckets,
moice; then pear, ms-poe, buckets, moice, base; ...), so that drift on a noisy machine (thermal, other jobs) hits every variant
alike and no variant always runs in the same slot. Each trial: prefill `context` random
tokens, then `new_tokens` greedy decoding steps with the cache, through the same variant
contract the evaluation harness uses. Reported per variant: median prefill tokens/s, decode
tokens/s and peak memory, and the median over trials of the paired ratio to the base model in
the same round (a ratio of medians would let drift between rounds leak in).

Peak memory: `pear.bench.memory`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text
from ..provenance import provenance
from ..errors import PearError
from ..evaluate.generate import context_window  # one reading of a config's window, for eval and bench
from .memory import PeakMemory, _model_bytes, memory_method

VARIANTS = ("base", "pear", "ms-poe", "attention-buckets", "moice")
# variant name -> (registry variant, which model it runs on, its options); moice-one-by-one on request:
# MoICE's experts one after another, re-rotating the cache (its memory is the base model's)
_RUNS = {"base": ("none", "base", {}), "pear": ("none", "pear", {}), "ms-poe": ("ms-poe", "base", {}),
         "attention-buckets": ("attention-buckets", "base", {}), "moice": ("moice", "base", {}),
         "moice-one-by-one": ("moice", "base", {"stack": False})}
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes")


# ---------------------------------------------------------------------------- one trial
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Trial:
    prefill_s: float
    decode_s: float
    extra_bytes: int | None


@torch.inference_mode()
def run_trial(lm, ids: torch.Tensor, new_tokens: int, device: str, mem_method: str) -> Trial:
    """Prefill `ids` (B, T), then `new_tokens` greedy steps with the cache; as the harness does it."""
    B, T = ids.shape
    mask = torch.ones_like(ids)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    with PeakMemory(mem_method, device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=True,
                 logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            pos = pos[:, -1:] + 1
            out = lm(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                     logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        del out, past
    return Trial(t1 - t0, t2 - t1, mem.extra)


# ---------------------------------------------------------------------------- the benchmark
def check_same_architecture(base, folded, pear_dir) -> dict:
    """The PEAR checkpoint must be the base architecture exactly: same modules, same parameters."""
    from ..loading import count_parameters

    mods_b = [(n, type(m).__name__) for n, m in base.named_modules()]
    mods_p = [(n, type(m).__name__) for n, m in folded.named_modules()]
    shapes_b = [(n, tuple(p.shape)) for n, p in base.named_parameters()]
    shapes_p = [(n, tuple(p.shape)) for n, p in folded.named_parameters()]
    nb, np_ = count_parameters(base), count_parameters(folded)
    if mods_b != mods_p or shapes_b != shapes_p or nb != np_:
        diff = next((f"{a} vs {b}" for a, b in zip(mods_b + shapes_b, mods_p + shapes_p) if a != b),
                    f"{len(mods_b)} vs {len(mods_p)} modules")
        raise PearError(f"PEAR checkpoint {pear_dir} is not the base model's architecture ({diff}; "
                        f"{nb:,} vs {np_:,} parameters)")
    return {"parameters": nb, "modules": len(mods_b), "same_architecture": True}


def _summary(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    return {"median": statistics.median(v), "q1": q[0], "q3": q[2], "min": v[0], "max": v[-1], "trials": values}


def overhead(model: str | None, pear: str | None, *, context: int = 2048, new_tokens: int = 64, trials: int = 5,
             warmup: int = 1, batch: int = 1, variants=VARIANTS, dtype: str = "auto", device: str = "auto",
             seed: int = 0, variant_options: dict | None = None, progress=None) -> dict:
    """Run the interleaved benchmark; returns the result dict (see module docstring)."""
    from ..baselines import get_variant
    from ..loading import load_model, parse_device

    variants = list(variants)
    unknown = [v for v in variants if v not in _RUNS]
    if unknown:
        raise PearError(f"unknown benchmark variant(s) {unknown}; choose from {', '.join(_RUNS)}")
    if "pear" in variants and pear is None:
        raise PearError("the 'pear' variant needs --pear DIR (a PEAR-folded checkpoint)")
    if context < 1 or new_tokens < 1 or trials < 1 or batch < 1 or warmup < 0:
        raise PearError("--context, --new-tokens, --trials and --batch must be >= 1 (--warmup >= 0)")
    if pear is not None and not (Path(pear) / "config.json").is_file():
        raise PearError(f"--pear {pear}: not a model folder (no config.json)")
    dev = parse_device(device)
    base = load_model(model, dtype=dtype, device=dev)
    window = context_window(base.model)
    if window is not None and context + new_tokens > window:
        raise PearError(f"--context {context} + --new-tokens {new_tokens} exceeds this model's context window {window}")
    models = {"base": base}
    arch_check = None
    if "pear" in variants:
        models["pear"] = load_model(pear, dtype=next(base.model.parameters()).dtype if dtype == "auto" else dtype, device=dev)
        arch_check = check_same_architecture(base.model, models["pear"].model, pear)
    mem_method = memory_method(dev)
    vocab = base.model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    given = dict(variant_options or {})
    given.setdefault("moice", {"routers": "init"})  # its cost does not depend on the routers' values
    given.setdefault("moice-one-by-one", given["moice"])  # the same routers
    options = {v: {**given.get(v, {}), **run[2]} for v, run in _RUNS.items()}

    runnable, skipped = [], {}
    for v in variants:  # refuse early (and record why) variants that do not apply to this family
        name, which, _ = _RUNS[v]
        try:
            with get_variant(name).wrap(models[which], **options[v]):
                pass
            runnable.append(v)
        except PearError as e:
            skipped[v] = str(e)

    raw = {v: [] for v in runnable}
    torch.manual_seed(seed)
    orders = []
    for r in range(warmup + trials):
        # rotate the order every round (a cyclic Latin square): no variant always runs first,
        # or always right after another (e.g. PEAR after base), so slot effects cancel
        k = r % max(1, len(runnable))
        order = runnable[k:] + runnable[:k]
        if r >= warmup:
            orders.append(order)
        for v in order:
            name, which, _ = _RUNS[v]
            with get_variant(name).wrap(models[which], **options[v]) as lm:
                t = run_trial(lm, ids, new_tokens, dev, mem_method)
            if r >= warmup:
                raw[v].append(t)
            if progress is not None:
                progress(r, v, t)

    weights = {k: _model_bytes(m.model) for k, m in models.items()}
    results = {}
    for v in runnable:
        which = _RUNS[v][1]
        per = {
            "prefill_tokens_per_s": [batch * context / t.prefill_s for t in raw[v]],
            "decode_tokens_per_s": [batch * new_tokens / t.decode_s for t in raw[v]],
        }
        if mem_method != "none":
            per["peak_memory_bytes"] = [weights[which] + t.extra_bytes for t in raw[v]]
        results[v] = {m: _summary(vals) for m, vals in per.items()}
    if "base" in results:
        for v in results:
            ratio = {}
            for m in results[v]:
                paired = [a / b for a, b in zip(results[v][m]["trials"], results["base"][m]["trials"])]
                ratio[m] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
            results[v]["ratio_to_base"] = ratio
    return {
        "benchmark": "overhead",
        "settings": {"model": model, "pear": pear, "context": context, "new_tokens": new_tokens, "trials": trials,
                     "warmup": warmup, "batch": batch, "variants": variants, "dtype": dtype,
                     "seed": seed, "variant_options": {v: options[v] for v in variants}, "input": "uniform random token ids",
                     "order_per_trial": orders},
        "device": dev,
        **provenance(dev),
        "memory_method": mem_method,
        "weights_bytes": weights,
        "pear_checkpoint": arch_check,
        "not_applicable": skipped,
        "variants": results,
    }



def format_table(res: dict) -> str:
    head = (f"{'variant':<19}{'prefill tok/s':>14}{'x base':>8}{'decode tok/s':>14}{'x base':>8}"
            f"{'peak MiB':>11}{'x base':>8}")
    lines = [head, "-" * len(head)]
    for v, r in res["variants"].items():
        cells = [f"{v:<19}"]
        for m, w in zip(METRICS, (14, 14, 11)):
            if m not in r:
                cells.append(f"{'-':>{w}}{'-':>8}")
                continue
            val = r[m]["median"] / (2**20 if m == "peak_memory_bytes" else 1)
            ratio = r.get("ratio_to_base", {}).get(m, {}).get("median")
            cells.append(f"{val:>{w}.1f}" + (f"{ratio:>8.2f}" if ratio is not None else f"{'-':>8}"))
        lines.append("".join(cells))
    for v, why in res.get("not_applicable", {}).items():
        lines.append(f"{v:<19}not applicable: {why}")
    return "\n".join(lines)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")
