"""Results cache keyed on content: a (model, task) result is reused when the same weights read
the same prompts under the same variant and settings, wherever the files lie and whatever
their dates.

The model's part of the key is a SHA-256 over its weight files (safetensors, bin or GGUF
bytes, plus config.json and generation_config.json); each file's hash is remembered per (path, size, mtime) in
`$PEAR_CACHE/hashes.json`, so it is computed once per file version (a second for 500 MB).
Copying, moving or touching a model keeps its results; changing one weight does not. A model
handed over in memory (a `LoadedModel`) is keyed on its tensors, since it may differ from
its files. A folder holding only an adapter (no config.json) and a `pear.json` naming its
base is keyed on its files plus the base's key. A variant option that names local files (MoICE's
routers=DIR) enters the key by their content, as a model does.

Results are saved in parts of PART_SIZE examples, each as soon as it is done, as
LABEL__TASK__KEY.json.gz; a part is found by task and key alone, so a renamed --label reuses it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..atomic import write_gzip, write_text
from ..loading import LoadedModel, cache_dir, resolve_spec

log = logging.getLogger("pear")
KEY_VERSION = 2
PART_SIZE = 2048  # examples per saved part
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


# ------------------------------------------------------------------ model keys
def _hash_store() -> Path:
    return cache_dir() / "hashes.json"


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, remembered per (resolved path, size, mtime): cheap the second time."""
    p = Path(path).resolve()
    st = p.stat()
    store = _hash_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    hit = known.get(str(p))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_text(store, json.dumps(known, indent=0) + "\n")
    except OSError as e:  # a read-only cache folder costs time, not results
        log.info("cannot remember file hashes in %s: %s", store, e)
    return h.hexdigest()


def tensors_sha256(model) -> str:
    """SHA-256 over a model's tensors in memory (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            continue
        h.update(f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x01".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _files_hash(named: list[tuple[str, Path]]):
    """A running SHA-256 over (name, content hash) pairs: how a model's and an option's files enter a key."""
    h = hashlib.sha256()
    for name, f in named:
        h.update(f"{name}\x00{file_sha256(f)}\x01".encode())
    return h


def spec_key(spec: str | os.PathLike, _seen: tuple = ()) -> str | None:
    """Content key of the model a spec names (its weight files and config), or None where
    there are no local files to hash (a hub id)."""
    ms = resolve_spec(spec)
    folder = Path(ms.path)
    if ms.gguf_file:
        files = [folder / ms.gguf_file]
    elif ms.kind == "hub":
        return None
    else:
        files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name in
                       ("config.json", "generation_config.json", "adapter_config.json"))
    h = _files_hash([(f.name, f) for f in files])
    meta = folder / "pear.json"
    if not ms.gguf_file and not (folder / "config.json").is_file() and meta.is_file():
        base = json.loads(meta.read_text()).get("base_model")
        if base and str(base) not in _seen:
            h.update(f"pear.json\x00{file_sha256(meta)}\x00base\x00{spec_key(base, _seen + (str(base),))}".encode())
    return h.hexdigest()


def model_key(spec, loaded: LoadedModel) -> str:
    """What the results of `spec` (as loaded in `loaded`) depend on, as a hex digest."""
    key = None if isinstance(spec, LoadedModel) else spec_key(spec)
    return key or tensors_sha256(loaded.model)


def options_key(options: dict) -> dict:
    """A variant's options as they enter the key: an option naming a local file or folder (MoICE's
    trained routers) by its files' content, so that routers trained again in the same folder are
    not mistaken for the old ones and a copied folder keeps its results."""
    def content(v):
        p = Path(str(v))
        if not isinstance(v, (str, os.PathLike)) or not str(v) or not p.exists():
            return v
        named = [(str(f.relative_to(p)), f) for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir() else [("", p)]
        return f"sha256:{_files_hash(named).hexdigest()}"
    return {k: content(v) for k, v in options.items()}


def part_key(model: str, variant: str, options: dict, task, texts: list[str], ids: list[list[int]],
             settings: dict) -> str:
    """Key of one part: model content key, variant and options (as `options_key` gives them),
    the task's examples as the model reads them (rendered prompts and their token ids, answers),
    and the settings that change outputs."""
    h = hashlib.sha256()
    for e, t, x in zip(task.examples, texts, ids):
        h.update(f"{e.id}\x00{e.condition}\x00{t}\x00{x}\x00{e.answers}\x01".encode())
    key = {"v": KEY_VERSION, "model": model, "variant": variant, "options": options, "task": task.name,
           "kind": task.kind, "max_new_tokens": task.max_new_tokens, "choices": task.choices,
           "prompts": h.hexdigest(), **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ parts on disk
def read_part(path: str | os.PathLike) -> dict:
    """One part as `ResultsCache.save` wrote it: label, task, spec, start, of and per-example records."""
    with gzip.open(path, "rt") as f:
        return json.load(f)


class ResultsCache:
    """A folder of parts; `None` folder: nothing is kept (every lookup misses)."""

    def __init__(self, folder=None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def find(self, task: str, key: str) -> dict | None:
        if self.folder is None:
            return None
        for part in sorted(self.folder.glob(f"*__{task}__{key}.json.gz")):
            stored = read_part(part)
            log.info("reusing %s", part)
            return stored
        return None

    def save(self, label: str, task: str, key: str, stored: dict) -> None:
        if self.folder is None:
            return
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[-60:]
        write_gzip(self.folder / f"{safe}__{task}__{key}.json.gz", [json.dumps(stored)])
