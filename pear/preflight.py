"""Checks every command makes before it loads a model or computes anything.

A run that fails after twenty minutes because its output folder is read-only, or because
K exceeds the model's heads, loses the work. What can be known from the arguments, the file
system and the model's config alone is checked first, and fails as one `PearError` line
with nothing written.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

from .errors import PearError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable(path: str | os.PathLike) -> None:
    """Refuse `path` if it cannot be created: its nearest existing ancestor must be a folder in
    which a file can really be made (``os.access`` says yes on read-only mounts and for root)."""
    path = Path(path)
    base = _nearest_existing(path.parent if not path.is_dir() else path)
    if not base.is_dir():
        raise PearError(f"cannot write {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".pear-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PearError(f"cannot write {path}: {e.strerror or e} ({base})") from None


def check_out_file(path: str | os.PathLike, force: bool, *, suffix: str | None = ".json",
                   also: tuple[str, ...] = (), example: str = "results.json") -> Path:
    """An output file: the right suffix, not a folder, absent (or `force`), writable.
    `also`: sibling files written with it (suffixes such as ".png"), under the same --force rule."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise PearError(f"--out must be a {suffix} file, got {path}")
    if path.is_dir():
        raise PearError(f"--out {path} is a folder; give a file name like {example}")
    existing = [p for p in [path, *(path.with_suffix(s) for s in also)] if p.exists()]
    if existing and not force:
        raise PearError(f"{existing[0]} exists; pass --force to overwrite")
    check_writable(path)
    return path


def check_out_folder(path: str | os.PathLike, force: bool) -> Path:
    """An output folder: absent or empty (or `force`), and creatable."""
    from .folding.checkpoint import check_out_dir

    out = check_out_dir(path, force)
    check_writable(out)
    return out


# ---------------------------------------------------------------------------- the model's shape
@functools.lru_cache(maxsize=16)
def model_shape(spec: str | None) -> tuple[int, int] | None:
    """(layers, heads per layer) from the config alone, without loading weights; None when it
    cannot be known cheaply (a hub id, an unusual config). Raises PearError for a bad spec."""
    from .loading import resolve_spec

    ms = resolve_spec(spec)
    if ms.kind == "hub":
        return None
    if ms.gguf_file:
        return _gguf_shape(Path(ms.path) / ms.gguf_file)
    return _config_shape(Path(ms.path) / "config.json")


def _config_shape(path: Path) -> tuple[int, int] | None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PearError(f"cannot read {path}: {e}") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers") if k in cfg), None)
    heads = next((cfg[k] for k in ("num_attention_heads", "n_head", "n_heads") if k in cfg), None)
    if isinstance(layers, int) and isinstance(heads, int) and layers > 0 and heads > 0:
        return layers, heads
    return None


def _gguf_shape(path: Path) -> tuple[int, int] | None:
    from .loading import converted_folder

    cached = converted_folder(path)
    if (cached / "config.json").is_file():
        return _config_shape(cached / "config.json")
    meta = gguf_metadata(path)
    if meta.get("layers") and meta.get("heads"):
        return int(meta["layers"]), int(meta["heads"])
    return None


def gguf_metadata(path: str | os.PathLike) -> dict:
    """{"architecture", "layers", "heads", "file_type"} read from a GGUF header (no weights)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise PearError(f"cannot read GGUF file {path}: {e}") from None

    def field(name):
        f = r.fields.get(name)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    ft = field("general.file_type")
    try:
        ft_name = gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft is not None else None
    except ValueError:
        ft_name = str(ft)
    return {"architecture": arch, "layers": field(f"{arch}.block_count"),
            "heads": field(f"{arch}.attention.head_count"), "file_type": ft_name}


def check_k(spec: str | None, k, *, top_m: int | None = None) -> None:
    """K (and fast discovery's M) must fit the model's head count, known from its config."""
    shape = model_shape(spec)
    if shape is None:
        return
    total = shape[0] * shape[1]
    for name, v in (("--k", k), ("--top-m", top_m)):
        if isinstance(v, int) and v > total:
            raise PearError(f"{name} {v} is more than the model's {total} heads ({shape[0]} layers x {shape[1]})")


def check_heads(spec: str | None, heads) -> None:
    """Every (layer, head) must exist in the model (known from its config)."""
    shape = model_shape(spec)
    if shape is None:
        return
    for layer, head in heads:
        if not 0 <= layer < shape[0]:
            raise PearError(f"layer {layer} out of range: the model has {shape[0]} layers (0..{shape[0] - 1})")
        if not 0 <= head < shape[1]:
            raise PearError(f"head {head} out of range: the model has {shape[1]} heads per layer (0..{shape[1] - 1})")


def check_discovery_settings(settings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Discovery ablates by the batch mean: one sample per setting would ablate nothing."""
    for n, length in settings:
        if n < 2:
            raise PearError(f"discovery setting {n}x{length}: need N >= 2 samples (the mean over one "
                            "sample is that sample: ablating it changes nothing)")
    return settings
