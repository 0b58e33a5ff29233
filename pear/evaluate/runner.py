"""`evaluate`: several models (or one model under several variants) on the same examples.

For each model entry (spec + variant + label): load it (reused while the next entry has the
same spec), wrap it in its variant, then for each task render the prompts (once per loaded
model: its variants read the same texts), score them (`scoring`: what does not fit the context
window is skipped and counted, never truncated) and summarise (`summary`: accuracy with 95 %
intervals, paired tests against the first model).

With `parts_dir`, each (model, task) result is saved there in parts of PART_SIZE examples as
soon as each is done, keyed on content (`cache`: weights, variant, prompts, settings) and
reused by any later run that asks for the same: a long run killed by a time limit continues
where it stopped, and separate runs (one per model or task) can be assembled into one file.
With parts="only" nothing is computed: what the folder holds is assembled, and a (model,
task) with a missing part is left out of the results and listed under "missing".

Data-parallel: the same command under `torchrun --nproc-per-node N -m pear eval ...` or
`accelerate launch -m pear eval ...` shares each part's batches between the N processes
(`pear.distributed`); every process ends with the whole results, rank 0 reads and writes the
parts and the files.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..errors import PearError
from ..loading import LoadedModel, load_model
from ..provenance import device_name, provenance
from . import data
from .cache import PART_SIZE, ResultsCache, model_key, options_key, part_key
from .generate import batch_limits, context_window
from .continuous import ContinuousDecoder, supports_continuous
from .continuous_static import ContinuousStaticDecoder, supports_continuous_static
from .packed import PREFILLS as PACKED, PackedDecoder, supports_packed
from .static_decode import StaticDecoder, supports_static
from .prompts import has_chat_template
from .registry import BuildContext, Task, build_task, parse_positions
from .report import save_results
from .scoring import render_prompts, run_task
from .summary import summarise

__all__ = ["ModelEntry", "as_entries", "assign_labels", "evaluate", "render_prompts", "run_task", "save_results",
           "PART_SIZE"]


@dataclass
class ModelEntry:
    """One evaluated column: a model spec (or an already loaded model) under a variant."""

    spec: Any  # str | os.PathLike | LoadedModel
    variant: str = "none"
    label: str | None = None
    options: dict = field(default_factory=dict)  # variant options

    @property
    def spec_str(self) -> str:
        return self.spec.spec.spec if isinstance(self.spec, LoadedModel) else str(self.spec)


def as_entries(models) -> list[ModelEntry]:
    out = []
    for m in models:
        if isinstance(m, ModelEntry):
            out.append(m)
        elif isinstance(m, tuple):
            out.append(ModelEntry(*m))
        else:
            out.append(ModelEntry(m))
    if not out:
        raise PearError("no model to evaluate")
    return out


def assign_labels(entries: list[ModelEntry]) -> list[str]:
    """"spec" or "spec+variant"; a repeated label gets "#2", "#3"; given labels must be unique."""
    given = [e.label for e in entries if e.label]
    if len(given) != len(set(given)):
        raise PearError(f"duplicate --label among {given}")
    labels, seen = [], set(given)
    for e in entries:
        if e.label:
            labels.append(e.label)
            continue
        base = e.spec_str + ("" if e.variant == "none" else f"+{e.variant}")
        lab, k = base, 2
        while lab in seen:
            lab, k = f"{base}#{k}", k + 1
        seen.add(lab)
        labels.append(lab)
    return labels


# ------------------------------------------------------------------ one (model, task)
class Prompts:
    """One loaded model's rendered prompts, per task. The entries that share a model (base and
    its variants) read the same texts, so each task is rendered and tokenised once instead of
    once per entry: mdqa-10's 8,850 prompts take 11 s in one process on 2 CPU cores, and every
    process of a launch renders them all. Token ids are kept as int32 arrays (a full mdqa-20
    holds 27M tokens) and become lists one part at a time."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self._by_task = loaded, {}

    def get(self, task: Task, chat: str) -> tuple[list[str], list[np.ndarray]]:
        if (task.name, chat) not in self._by_task:
            texts, ids = render_prompts(self.loaded, task, chat)
            self._by_task[task.name, chat] = texts, [np.asarray(x, dtype=np.int32) for x in ids]
        return self._by_task[task.name, chat]


@dataclass
class Job:
    """What every part of one (model, task) shares."""

    lm: Any  # the model under its variant
    loaded: LoadedModel
    entry: ModelEntry
    label: str
    model_key: str | None  # content key (rank 0, with a cache), else None
    options_key: dict | None  # the variant's options as they enter the key (files by content)
    rows: int
    tokens: int
    chat: str
    progress: bool
    prompts: Prompts  # shared by the jobs of one loaded model
    decoder: Any = None  # StaticDecoder / ContinuousDecoder (--decode), PackedDecoder (--prefill packed); None: eager


def run_parts(job: Job, task: Task, cache: ResultsCache,
              parts: str) -> tuple[list[str], list[dict] | None, float, dict[str, int]]:
    """(rendered prompts, records or None where a part is missing, seconds, how many parts each number
    of processes computed), part by part: a part in the cache is read (by rank 0, and sent to the
    others), a missing one computed by all processes together and saved by rank 0.

    Why the process counts: a part's key holds what it computed, not how many processes shared it,
    and under continuous decoding the split decides which prompts join which running batch, so 16-bit
    answers can differ between counts; a table assembled from parts of several counts says so."""
    texts, arrays = job.prompts.get(task, job.chat)
    recs, secs, made = [], 0.0, Counter()
    step = PART_SIZE if cache.folder is not None else max(1, len(texts))
    settings = {"dtype": str(next(job.loaded.model.parameters()).dtype), "window": context_window(job.loaded.model),
                **({"decode": job.decoder.name} if job.decoder is not None and task.kind == "generate" else {})}
    for s0 in range(0, len(texts), step):  # parts: a killed run loses at most one
        sub = dataclasses.replace(task, examples=task.examples[s0: s0 + step])
        ids = [a.tolist() for a in arrays[s0: s0 + step]]
        key = None
        if job.model_key is not None:
            key = part_key(job.model_key, job.entry.variant, job.options_key, sub, texts[s0: s0 + step], ids, settings)
        stored = distributed.broadcast(cache.find(task.name, key) if key is not None else None)
        if stored is None:
            if parts == "only":
                return texts, None, secs, dict(made)
            t0 = time.perf_counter()
            rs = run_task(job.lm, job.loaded, sub, chat=job.chat, batch_size=job.rows, max_batch_tokens=job.tokens,
                          progress=job.progress, desc=f"{job.label} | {task.name}",
                          rendered=(texts[s0: s0 + step], ids), decoder=job.decoder)
            stored = {"label": job.label, "task": task.name, "seconds": time.perf_counter() - t0,
                      "start": s0, "of": len(texts), "spec": job.entry.spec_str,
                      "processes": distributed.world_size(), "records": rs}
            if key is not None:
                cache.save(job.label, task.name, key, stored)
        recs += stored["records"]
        secs += stored["seconds"]
        made[str(stored.get("processes", "unrecorded"))] += 1
    return texts, recs, secs, dict(made)


# ------------------------------------------------------------------ evaluate
DECODES = ("eager", "static", "continuous", "continuous-static")
PREFILLS = ("padded", *PACKED)
NEEDS = {"static": "plain transformers models of families that compile with a static cache (not a variant)",
         "continuous": "models whose layers keep their whole cache (no sliding window), plain or under moice",
         "continuous-static": "plain transformers models (not a variant) that compile with a static cache and keep "
                              "their whole cache in every layer",
         "packed": "plain transformers models (not a variant) with full attention in every layer, no softcapping, "
                   "attention through transformers' attention interface"}


def _decoder(lm, label: str, decode: str, prefill: str = "padded"):
    """The decoder of `lm` for `decode` and `prefill`, where they apply (None: the eager loop after a
    padded prefill); what does not apply is said once on stderr. The packed prefill serves the eager
    loop (`PackedDecoder`) and continuous batching's joins (either); the static path prefills its own way."""
    packed = prefill in PACKED and decode != "static" and supports_packed(lm)
    said = []
    if prefill in PACKED and not packed:
        needs = "the eager or continuous loop, not --decode static" if decode == "static" else NEEDS["packed"]
        said.append(f"prefills padded: --prefill {prefill} takes {needs}")
    if decode == "static" and supports_static(lm):
        decoder = StaticDecoder(lm)
    elif decode == "continuous" and supports_continuous(lm):
        decoder = ContinuousDecoder(prefill if packed else "padded")
    elif decode == "continuous-static" and supports_continuous_static(lm):
        decoder = ContinuousStaticDecoder(lm, prefill if packed else "padded")
    else:  # the eager loop, asked for or not
        if decode != "eager":
            said.append(f"decodes eagerly: --decode {decode} takes {NEEDS[decode]}")
        decoder = PackedDecoder(prefill) if packed else None
    if said and distributed.is_main():
        print(f"pear: {label} " + "; ".join(said), file=sys.stderr)
    return decoder


def _check(tasks, limit, batch_size, max_batch_tokens, max_new_tokens, parts, parts_dir, decode,
           prefill="padded") -> None:
    if decode not in DECODES:
        raise PearError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if prefill not in PREFILLS:
        raise PearError(f"prefill must be one of {', '.join(PREFILLS)}, got {prefill!r}")
    if parts not in ("reuse", "only"):
        raise PearError(f"parts must be reuse or only, got {parts!r}")
    if parts == "only" and parts_dir is None:
        raise PearError("--parts only needs the --parts-dir to assemble")
    if limit is not None and limit < 1:
        raise PearError(f"--limit must be >= 1, got {limit}")
    for name, v in (("--batch-size", batch_size), ("--max-batch-tokens", max_batch_tokens)):
        if v != "auto" and not (isinstance(v, int) and v >= 1):
            raise PearError(f"{name} must be 'auto' or an integer >= 1, got {v!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PearError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if len(set(tasks)) != len(tasks):
        raise PearError(f"a task is given twice in {tasks}")


def _model_info(entry: ModelEntry, label: str, loaded: LoadedModel, rows: int, tokens: int, decoder) -> dict:
    decode, prefill = ("eager", "padded") if decoder is None else (decoder.decode, decoder.prefill)
    return {"label": label, "spec": entry.spec_str, "variant": entry.variant, "variant_options": entry.options,
            "source": loaded.spec.kind, "path": loaded.spec.path,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "context_window": context_window(loaded.model), "chat_template": has_chat_template(loaded.tokenizer),
            "batch_limits": {"rows": rows, "tokens": tokens}, "decode": decode,
            "prefill": prefill}


def evaluate(models, tasks: list[str], *, data_dir=None, limit: int | None = None, half: int | None = None,
             positions=None,
             seed: int = 0, dtype: str = "auto", device: str = "auto", device_map=None, batch_size: int | str = "auto",
             max_batch_tokens: int | str = "auto", chat: str = "auto", distractor_pool: str = "nq",
             n_resamples: int = 10_000, log_samples: bool = False, parts_dir=None, parts: str = "reuse",
             progress: bool = True, max_new_tokens: int | None = None, command: str | None = None,
             decode: str = "eager", prefill: str = "padded") -> dict:
    """Evaluate every model entry on every task; return the results dict (see module doc).

    models: specs (str), LoadedModel objects, (spec, variant[, label]) tuples or ModelEntry.
    With `log_samples`, results["samples"] holds one dict per (model, example): rendered
    prompt, output, score (`save_results` moves them to a .samples.jsonl.gz file).
    batch_size / max_batch_tokens: ints, or "auto" (`generate.batch_limits`: by device and free
    GPU memory; the values used are recorded per model under "batch_limits").
    parts (with `parts_dir`): "reuse" (compute what is missing) or "only" (compute nothing;
    assemble what is there; results["missing"] lists the (label, task) left incomplete).
    decode: greedy decoding, "eager" (a Python loop over the forward), "static" (a static KV
    cache and a decoding step compiled on CUDA: `static_decode`), "continuous" (finished rows
    make room for waiting prompts: `continuous`) or "continuous-static" (both: `continuous_static`);
    prefill: "padded" (the prompts of a batch left-padded), "packed" (in one row without padding:
    `packed`; for the eager and continuous loops) or "compiled" (packed, the decoder blocks compiled:
    `packed.compiled_prefill`). Where a model cannot take the path asked for (a variant, a
    sliding-window layer; MoICE does take continuous), it decodes eagerly / prefills padded, as
    models_info records.
    """
    from ..baselines import get_variant

    _check(tasks, limit, batch_size, max_batch_tokens, max_new_tokens, parts, parts_dir, decode, prefill)
    distributed.init()
    entries = as_entries(models)
    labels = assign_labels(entries)
    variants = [get_variant(e.variant) for e in entries]  # unknown names fail before any work
    for e, v in zip(entries, variants):
        v.check_options(e.options)
    if positions is not None:  # "1,5,10" or ["1", "5", "10"]; checked here for API callers too
        positions = parse_positions(positions if isinstance(positions, str) else ",".join(map(str, positions)))
    ddir = data.resolve_data_dir(data_dir)
    ctx = BuildContext(ddir, limit=limit, half=half, positions=positions, seed=seed,
                       options={"distractor_pool": distractor_pool})
    built = [build_task(t, ctx) for t in tasks]
    for t in built:
        t.max_new_tokens = max_new_tokens or t.max_new_tokens
    cache = ResultsCache(parts_dir)
    records: dict[str, dict[str, list[dict]]] = {t.name: {} for t in built}
    samples, models_info, timing, missing = [], [], {}, []
    loaded, loaded_key, prompts = None, None, None
    for entry, label, variant in zip(entries, labels, variants):
        if isinstance(entry.spec, LoadedModel):
            loaded, loaded_key = entry.spec, None
        elif loaded_key != (entry.spec_str, dtype, device):
            loaded, prompts = None, None  # the previous model's memory is freed before the next loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            loaded = load_model(entry.spec_str, dtype=dtype, device=device, device_map=device_map)
            loaded_key = (entry.spec_str, dtype, device)
        if prompts is None or prompts.loaded is not loaded:
            prompts = Prompts(loaded)
        rows, tokens = batch_limits(loaded.model, batch_size, max_batch_tokens,
                                    memory_factor=variant.memory_factor(entry.options))
        mkey = model_key(entry.spec, loaded) if cache.folder is not None and distributed.is_main() else None
        okey = options_key(entry.options) if mkey is not None else None
        timing[label] = {}
        with variant.wrap(loaded, **entry.options) as lm:
            decoder = _decoder(lm, label, decode, prefill)
            models_info.append(_model_info(entry, label, loaded, rows, tokens, decoder))
            if getattr(lm, "pear_variant_info", None) is not None:  # what a variant chose (e.g. a searched channel)
                models_info[-1]["variant_info"] = lm.pear_variant_info
            job = Job(lm, loaded, entry, label, mkey, okey, rows, tokens, chat, progress, prompts, decoder)
            for task in built:
                texts, recs, secs, made = run_parts(job, task, cache, parts)
                if recs is None:
                    missing.append({"label": label, "task": task.name})
                    continue
                records[task.name][label] = recs
                n_run = sum(not r["skipped"] for r in recs)
                timing[label][task.name] = {"seconds": round(secs, 2), "examples": n_run,
                                            "examples_per_s": round(n_run / secs, 3) if secs > 0 else None,
                                            "parts_by_processes": made}
                if len(made) > 1 and distributed.is_main():
                    print(f"pear: {label} {task.name}: parts computed by {' and '.join(sorted(made))} processes "
                          "(16-bit answers can depend on how the prompts were split)", file=sys.stderr)
                if log_samples:
                    samples += [{"task": task.name, "model": label, **r, "answers": e.answers, "prompt": t,
                                 "meta": e.meta} for e, t, r in zip(task.examples, texts, recs)]
    dev = loaded.model.get_input_embeddings().weight.device if loaded is not None else None
    results = {
        "settings": {
            "command": command if command is not None else " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name(dev) if dev is not None else "none", "processes": distributed.world_size(),
            "tasks": tasks, "limit": limit, "half": half, "positions": positions, "seed": seed,
            "max_new_tokens": {t.name: t.max_new_tokens for t in built if t.kind == "generate"},
            "dtype": dtype, "decode": decode, "prefill": prefill, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "chat": chat,
            "distractor_pool": distractor_pool, "bootstrap_resamples": n_resamples, "data_dir": str(ddir),
            "data_files": data.data_stamps(ddir), **provenance(dev),
        },
        "models": models_info,
        "tasks": {t.name: summarise(t, labels, records[t.name], n_resamples=n_resamples, seed=seed) for t in built},
        "timing": timing,
    }
    if missing:
        results["missing"] = missing
    if log_samples:
        results["samples"] = samples
    return results
