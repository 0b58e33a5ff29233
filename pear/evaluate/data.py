"""Where evaluation data lives, and readers for its files.

The folder is `--data-dir`, else `$PEAR_DATA`. It is read-only and never copied into the
repository. A missing file is one `PearError` naming the file and the folder looked in.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

from ..errors import PearError

NQ_ORACLE = "litm/nq-open-oracle.dev.jsonl.gz"
KV_75 = "litm/kv-retrieval-75_keys.jsonl.gz"
HOTPOTQA = "hotpotqa/hotpot_dev_distractor.dev.json.gz"
SQUAD = "squad_v2/dev-v2.0.json.gz"
MMLU = "mmlu"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    d = data_dir or os.environ.get("PEAR_DATA")
    if not d:
        raise PearError("no evaluation data folder: pass --data-dir DIR or set PEAR_DATA")
    p = Path(d).expanduser()
    if not p.is_dir():
        src = "--data-dir" if data_dir else "$PEAR_DATA"
        raise PearError(f"evaluation data folder {p} (from {src}) does not exist")
    return p


def data_file(data_dir: Path, rel: str) -> Path:
    f = Path(data_dir) / rel
    if not f.exists():
        raise PearError(f"evaluation data file '{rel}' not found in {data_dir} "
                        "(set --data-dir or $PEAR_DATA to the data folder)")
    return f


def file_stamp(path: Path) -> str:
    """Identifies a data file's version for caches and results: name, size, mtime."""
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    with _open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path):
    with _open(path) as f:
        return json.load(f)


def read_mmlu(data_dir: Path, split: str) -> dict[str, list[tuple[str, list[str], int]]]:
    """{subject: [(question, [4 choices], answer index)]}, subjects sorted."""
    folder = data_file(data_dir, f"{MMLU}/{split}")
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise PearError(f"no MMLU files '*_{split}.csv' in {folder}")
    out = {}
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        out[f.name[: -len(f"_{split}.csv")]] = [
            (r["question"], [r[f"choice{i}"] for i in range(4)], int(r["answer"])) for r in rows]
    return out


def data_stamps(ddir: Path) -> dict:
    """file_stamp of each data file the tasks read, for the results' record of what was read."""
    return {rel: file_stamp(ddir / rel) for rel in (NQ_ORACLE, KV_75, HOTPOTQA, SQUAD) if (ddir / rel).exists()}
