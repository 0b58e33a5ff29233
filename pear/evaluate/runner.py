"""`evaluate`: several models (or one model under several variants) on the same examples.

For each model entry (spec + variant + label): load it (reused while the next entry has the
same spec), wrap it in its variant, then for each task render the prompts (chat template for
instruct models on generation tasks), skip and count those that do not fit the context
window (never truncate), decode greedily or score the choices, and score. Then per task,
model and condition: accuracy, count, 95 % Wilson interval; each model against the first
one on the examples both scored: paired bootstrap and exact McNemar.

With `parts_dir`, each (model, task) result is saved there in parts of PART_SIZE examples as
soon as each is done, and reused by a later run with identical inputs (same prompts, model
files, variant, dtype, decoding length): a long run killed by a time limit continues where
it stopped, and separate runs (one per model or task) can be assembled into one file.
Data-parallel over several processes (one per GPU, say), all running the same command on one
parts folder: with parts="claim" each process first claims a part (an exclusive
PART.claim file) and leaves parts claimed by others to them; with parts="only" nothing is
computed: what the folder holds is assembled, and a (model, task) with a missing part is left
out of the results and listed under "missing".
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import open_atomic, write_text
from ..errors import PearError
from ..loading import LoadedModel, load_model
from . import data
from .generate import batch_limits, context_window, eos_token_ids, greedy_generate, next_token_logprobs
from .prompts import has_chat_template, render
from .registry import BuildContext, Task, build_task, parse_positions
from .stats import compare, wilson

log = logging.getLogger("pear")
PART_VERSION = 1
PART_SIZE = 2048  # examples per saved part when resuming is on


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
def _use_chat(task: Task, tokenizer, chat: str) -> bool:
    if chat not in ("auto", "on", "off"):
        raise PearError(f"--chat must be auto, on or off, not '{chat}'")
    if not task.chat or chat == "off":
        return False
    if chat == "on" and not has_chat_template(tokenizer):
        raise PearError("--chat on, but the model's tokenizer has no chat template")
    return has_chat_template(tokenizer)


def _estimating(bar, n_total: int, desc: str, progress: bool):
    """The bar's update, which after the first batch also prints what the rest will take
    (measured on that batch) before the long part."""
    from ..estimate import fmt_seconds

    t0, first = time.perf_counter(), [True]

    def update(n: int) -> None:
        bar.update(n)
        if first[0] and progress and n < n_total:
            first[0] = False
            dt = time.perf_counter() - t0
            bar.write(f"pear: {desc}: first {n} examples in {dt:.1f} s; estimate ~{fmt_seconds(dt / n * (n_total - n))} "
                      f"for the other {n_total - n}", file=sys.stderr)

    return update


def run_task(lm, loaded: LoadedModel, task: Task, *, chat: str = "auto", batch_size: int = 8,
             max_batch_tokens: int = 32768, progress: bool = True, desc: str = "",
             rendered: tuple[list[str], list[list[int]]] | None = None) -> list[dict]:
    """Records, one per example, in example order: id, condition, score (None = skipped),
    output, n_prompt_tokens, and for choice tasks the choice log-probabilities."""
    from tqdm.auto import tqdm

    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise PearError(f"model '{loaded.spec.spec}' has no tokenizer; cannot evaluate it")
    texts, ids = rendered or render_prompts(loaded, task, chat)
    window = context_window(model)
    extra = task.max_new_tokens if task.kind == "generate" else 0
    fits = [window is None or len(x) + extra <= window for x in ids]
    keep = [i for i, f in enumerate(fits) if f]
    device = model.get_input_embeddings().weight.device
    records = [{"id": e.id, "condition": e.condition, "score": None, "output": None,
                "n_prompt_tokens": len(x), "skipped": not f} for e, x, f in zip(task.examples, ids, fits)]
    bar = tqdm(total=len(ids), unit="ex", desc=desc or task.name, disable=not progress, dynamic_ncols=True, leave=False)
    bar.update(len(ids) - len(keep))
    kw = dict(pad_id=tok.pad_token_id, device=device, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
              on_batch=_estimating(bar, len(keep), desc or task.name, progress))
    if task.kind == "generate":
        exs = [task.examples[i] for i in keep]

        def done(j, new):
            return task.done is not None and task.done(tok.decode(new, skip_special_tokens=True), exs[j])

        outs = greedy_generate(lm, [ids[i] for i in keep], eos_ids=eos_token_ids(model, tok),
                               max_new_tokens=task.max_new_tokens, done=done, **kw)
        for i, new in zip(keep, outs):
            text = tok.decode(new, skip_special_tokens=True)
            records[i].update(output=text, score=float(task.score(text, task.examples[i])), n_new_tokens=len(new))
    elif task.kind == "choice":
        cand = []
        for c in task.choices:
            t = tok.encode(c, add_special_tokens=False)
            if len(t) != 1:
                raise PearError(f"task {task.name}: choice {c!r} is {len(t)} tokens for this tokenizer; "
                                "only single-token choices are supported")
            cand.append(t[0])
        lp = next_token_logprobs(lm, [ids[i] for i in keep], cand, **kw)
        for i, row in zip(keep, lp):
            ex = task.examples[i]
            pred = int(row.argmax())
            records[i].update(output=task.choices[pred].strip(), logprobs=[round(float(v), 4) for v in row],
                              score=float(task.choices[pred].strip() == ex.answers[0]))
    else:
        raise PearError(f"task {task.name}: unknown kind {task.kind}")
    bar.close()
    return records


def render_prompts(loaded: LoadedModel, task: Task, chat: str) -> tuple[list[str], list[list[int]]]:
    """The exact texts the model reads and their token ids. A chat-rendered text already
    holds its special tokens, so no others are added to it."""
    tok = loaded.tokenizer
    use_chat = _use_chat(task, tok, chat)
    texts = [render(tok, e.prompt, use_chat) for e in task.examples]
    ids = tok(texts, add_special_tokens=not use_chat)["input_ids"]
    return texts, [list(x) for x in ids]


# ------------------------------------------------------------------ summaries
def _acc(scores: list[float]) -> dict:
    n, k = len(scores), float(sum(scores))
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else None, "n": n, "correct": int(k),
            "ci95": [lo, hi] if n else None}


def summarise(task: Task, labels: list[str], records: dict[str, list[dict]], *, n_resamples: int, seed: int) -> dict:
    conds = task.conditions + (["all"] if len(task.conditions) > 1 else [])
    out = {"metric": task.metric, "kind": task.kind, "positional": task.positional, "conditions": conds,
           "info": task.info, "models": {}, "paired": {}}
    for lab in (x for x in labels if x in records):  # a label with a missing part (parts="only") is left out
        m = {}
        for c in conds:
            rs = [r for r in records[lab] if c == "all" or r["condition"] == c]
            m[c] = _acc([r["score"] for r in rs if r["score"] is not None])
            m[c]["skipped"] = sum(r["score"] is None for r in rs)
        if any("subject" in e.meta for e in task.examples):
            subj: dict[str, list[float]] = {}
            for e, r in zip(task.examples, records[lab]):
                if r["score"] is not None:
                    subj.setdefault(e.meta["subject"], []).append(r["score"])
            m["subjects"] = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(subj.items())}
            m["macro_accuracy"] = sum(v["accuracy"] for v in m["subjects"].values()) / max(1, len(subj))
        out["models"][lab] = m
    first = labels[0]  # the reference of every paired test: no reference, no tests
    ref = {(r["id"], r["condition"]): r["score"] for r in records.get(first, [])}
    for lab in (x for x in labels[1:] if x in records and ref):
        cmp = {}
        for c in conds:
            pairs = [(ref[(r["id"], r["condition"])], r["score"]) for r in records[lab]
                     if (c == "all" or r["condition"] == c) and r["score"] is not None
                     and ref.get((r["id"], r["condition"])) is not None]
            cmp[c] = compare([a for a, _ in pairs], [b for _, b in pairs], n_resamples, seed)
        out["paired"][lab] = {"against": first, "conditions": cmp}
    return out


# ------------------------------------------------------------------ parts (resume)
def _model_stamp(loaded: LoadedModel) -> str:
    p = Path(loaded.spec.path)
    f = p / loaded.spec.gguf_file if loaded.spec.gguf_file else p / "config.json"
    files = [f] + (sorted(p.glob("*.safetensors")) if not loaded.spec.gguf_file else [])
    return "|".join(data.file_stamp(x) for x in files if x.exists()) or loaded.spec.path


def part_key(entry: ModelEntry, loaded: LoadedModel, task: Task, texts: list[str]) -> str:
    h = hashlib.sha256()
    for e, t in zip(task.examples, texts):
        h.update(f"{e.id}\x00{e.condition}\x00{t}\x00{e.answers}\x01".encode())
    key = {"v": PART_VERSION, "spec": entry.spec_str, "model": _model_stamp(loaded), "variant": entry.variant,
           "options": entry.options, "dtype": str(next(loaded.model.parameters()).dtype), "task": task.name,
           "kind": task.kind, "max_new_tokens": task.max_new_tokens, "choices": task.choices,
           "window": context_window(loaded.model), "prompts": h.hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _claim_file(part: Path) -> Path:
    return part.with_name(part.name + ".claim")


def _claim(part: Path) -> bool:
    """Claim `part` for this process (True), unless another process has (False)."""
    try:
        os.close(os.open(_claim_file(part), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _load_or_run(part: Path | None, parts: str, compute) -> dict | None:
    """A part's stored dict: read from `part` where it is saved, else `compute()`d and saved
    (its claim, if any, released); None where parts="only", or another process claimed it."""
    if part is not None and part.is_file():
        with gzip.open(part, "rt") as f:
            stored = json.load(f)
        log.info("reusing %s", part)
        return stored
    if parts == "only" or (parts == "claim" and not _claim(part)):
        return None
    stored = compute()
    if part is not None:
        _write_gzip(part, [json.dumps(stored)])
        _claim_file(part).unlink(missing_ok=True)
    return stored


def _part_path(parts_dir: Path, label: str, task: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[-60:]
    return Path(parts_dir) / f"{safe}__{task}__{key}.json.gz"


# ------------------------------------------------------------------ evaluate
def evaluate(models, tasks: list[str], *, data_dir=None, limit: int | None = None, half: int | None = None,
             positions=None,
             seed: int = 0, dtype: str = "auto", device: str = "auto", device_map=None, batch_size: int | str = "auto",
             max_batch_tokens: int | str = "auto", chat: str = "auto", distractor_pool: str = "nq",
             n_resamples: int = 10_000, log_samples: bool = False, parts_dir=None, parts: str = "reuse",
             progress: bool = True, max_new_tokens: int | None = None, command: str | None = None) -> dict:
    """Evaluate every model entry on every task; return the results dict (see module doc).

    models: specs (str), LoadedModel objects, (spec, variant[, label]) tuples or ModelEntry.
    With `log_samples`, results["samples"] holds one dict per (model, example): rendered
    prompt, output, score (`save_results` moves them to a .samples.jsonl.gz file).
    batch_size / max_batch_tokens: ints, or "auto" (`generate.batch_limits`: by device and free
    GPU memory; the values used are recorded per model under "batch_limits").
    parts (with `parts_dir`): "reuse" (compute what is missing), "claim" (compute only the
    missing parts no other process has claimed; results["missing"] lists the (label, task)
    left incomplete) or "only" (compute nothing; assemble what is there, list the rest).
    """
    from .. import __version__
    from ..baselines import get_variant

    if parts not in ("reuse", "claim", "only"):
        raise PearError(f"parts must be reuse, claim or only, got {parts!r}")
    if parts != "reuse" and parts_dir is None:
        raise PearError(f"--parts {parts} needs a --parts-dir shared by the processes")
    if parts_dir is not None:
        Path(parts_dir).mkdir(parents=True, exist_ok=True)
    if limit is not None and limit < 1:
        raise PearError(f"--limit must be >= 1, got {limit}")
    for name, v in (("--batch-size", batch_size), ("--max-batch-tokens", max_batch_tokens)):
        if v != "auto" and not (isinstance(v, int) and v >= 1):
            raise PearError(f"{name} must be 'auto' or an integer >= 1, got {v!r}")
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
    if len(set(tasks)) != len(tasks):
        raise PearError(f"a task is given twice in {tasks}")
    built = [build_task(t, ctx) for t in tasks]
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise PearError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        for t in built:
            t.max_new_tokens = max_new_tokens
    records: dict[str, dict[str, list[dict]]] = {t.name: {} for t in built}
    samples, models_info, timing, missing = [], [], {}, []
    loaded, loaded_key = None, None
    for entry, label, variant in zip(entries, labels, variants):
        if isinstance(entry.spec, LoadedModel):
            loaded, loaded_key = entry.spec, None
        elif loaded_key != (entry.spec_str, dtype, device):
            loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            loaded = load_model(entry.spec_str, dtype=dtype, device=device, device_map=device_map)
            loaded_key = (entry.spec_str, dtype, device)
        rows, tokens = batch_limits(loaded.model, batch_size, max_batch_tokens)
        models_info.append({"label": label, "spec": entry.spec_str, "variant": entry.variant,
                            "variant_options": entry.options, "source": loaded.spec.kind, "path": loaded.spec.path,
                            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
                            "context_window": context_window(loaded.model),
                            "chat_template": has_chat_template(loaded.tokenizer),
                            "batch_limits": {"rows": rows, "tokens": tokens}})
        timing[label] = {}
        with variant.wrap(loaded, **entry.options) as lm:
            for task in built:
                texts, ids = render_prompts(loaded, task, chat)
                recs, secs, complete = [], 0.0, True
                step = PART_SIZE if parts_dir is not None else len(texts)
                for s0 in range(0, len(texts), step):  # parts: a killed run loses at most one
                    sub = dataclasses.replace(task, examples=task.examples[s0: s0 + step])
                    sub_texts, sub_ids = texts[s0: s0 + step], ids[s0: s0 + step]
                    part = None
                    if parts_dir is not None:
                        part = _part_path(parts_dir, label, task.name, part_key(entry, loaded, sub, sub_texts))

                    def compute():
                        t0 = time.perf_counter()
                        rs = run_task(lm, loaded, sub, chat=chat, batch_size=rows,
                                      max_batch_tokens=tokens, progress=progress,
                                      desc=f"{label} | {task.name}", rendered=(sub_texts, sub_ids))
                        return {"label": label, "task": task.name, "seconds": time.perf_counter() - t0,
                                "start": s0, "of": len(texts), "spec": entry.spec_str, "records": rs}

                    stored = _load_or_run(part, parts, compute)
                    if stored is None:
                        complete = False
                        continue
                    recs += stored["records"]
                    secs += stored["seconds"]
                if not complete:
                    missing.append({"label": label, "task": task.name})
                    continue
                records[task.name][label] = recs
                n_run = sum(not r["skipped"] for r in recs)
                timing[label][task.name] = {"seconds": round(secs, 2), "examples": n_run,
                                            "examples_per_s": round(n_run / secs, 3) if secs > 0 else None}
                if log_samples:
                    for e, t, r in zip(task.examples, texts, recs):
                        samples.append({"task": task.name, "model": label, **r, "answers": e.answers,
                                        "prompt": t, "meta": e.meta})
    results = {
        "settings": {
            "command": command if command is not None else " ".join(sys.argv),
            "pear_version": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": _device_name(loaded), "tasks": tasks, "limit": limit, "half": half, "positions": positions, "seed": seed,
            "max_new_tokens": {t.name: t.max_new_tokens for t in built if t.kind == "generate"},
            "dtype": dtype, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "chat": chat,
            "distractor_pool": distractor_pool, "bootstrap_resamples": n_resamples, "data_dir": str(ddir),
            "data_files": _data_stamps(ddir),
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


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _device_name(loaded: LoadedModel | None) -> str:
    if loaded is None:
        return "none"
    dev = loaded.model.get_input_embeddings().weight.device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({torch.get_num_threads()} threads)"


def _data_stamps(ddir: Path) -> dict:
    out = {}
    for rel in (data.NQ_ORACLE, data.KV_75, data.HOTPOTQA, data.SQUAD):
        f = ddir / rel
        if f.exists():
            out[rel] = data.file_stamp(f)
    return out


def _write_gzip(path: Path, lines) -> None:
    """Text lines into a gzip file, atomically; mtime 0 in the header: same content, same bytes."""
    with open_atomic(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for line in lines:
            f.write(line.encode())


def save_results(results: dict, out) -> dict[str, Path]:
    """Write results JSON (+ .samples.jsonl.gz when samples are present, + a .md table and a
    .png plot), each atomically. Returns the paths written."""
    from .report import format_markdown, plot_results

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    samples = results.pop("samples", None)
    written = {}
    if samples is not None:
        sp = out.with_name(out.stem + ".samples.jsonl.gz")
        _write_gzip(sp, (json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        results["samples_file"] = sp.name
        written["samples"] = sp
    write_text(out, json.dumps(results, indent=1) + "\n")
    written["results"] = out
    written["table"] = write_text(out.with_suffix(".md"), format_markdown(results) + "\n")
    png = plot_results(results, out.with_suffix(".png"))
    if png is not None:
        written["plot"] = png
    return written
