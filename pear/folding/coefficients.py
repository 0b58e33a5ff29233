"""Head coefficients: what a coefficients.json holds, checked against a model's heads.

A coefficient is one scalar per head (the paper) or one scale per channel of the head (a
list of head_dim values). `pear fit` writes them, `pear fold` reads them. Where they act is the
file's `site` (SITES; absent: "output", the paper's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from ..errors import PearError
from ..families import Arch

HeadKey = tuple[int, int]  # (layer, head)
Coefficient = float | list[float]  # one scale for the head, or one per channel (head_dim values)
SITES = {  # where a head's scales act; both fold exactly into one projection's weights
    "output": "what the head returns: its slice of the attention output projection's input (PEAR)",
    "query": "where the head looks: its queries, the query projection's output before the rotation",
}


def check_site(site: str) -> str:
    if site not in SITES:
        raise PearError(f"unknown coefficient site '{site}'; use one of {', '.join(SITES)}")
    return site


def check_coefficients(arch: Arch, coefs: Mapping[HeadKey, Coefficient]) -> dict[HeadKey, Coefficient]:
    """Validate (layer, head) ranges, per-channel lengths and finiteness; return a plain
    sorted dict of floats (per head) or lists of head_dim floats (per channel)."""
    out = {}
    for (layer, head), a in sorted(coefs.items()):
        arch.check_head(layer, head)
        values = [float(v) for v in a] if is_channelwise(a) else [float(a)]
        if is_channelwise(a) and len(values) != arch.head_dim:
            raise PearError(f"coefficient for layer {layer} head {head} has {len(values)} channel scales; "
                            f"this model's heads have head_dim {arch.head_dim}")
        if not all(math.isfinite(v) for v in values):
            raise PearError(f"coefficient for layer {layer} head {head} is not finite ({a})")
        out[(layer, head)] = values if is_channelwise(a) else values[0]
    return out


def is_channelwise(a) -> bool:
    """A per-channel coefficient is a sequence (list, tuple, 1-d tensor) of head_dim scales."""
    return isinstance(a, (list, tuple)) or (isinstance(a, torch.Tensor) and a.dim() == 1)


def granularity(coefs: Mapping[HeadKey, Coefficient]) -> str:
    """"head" (one scale per head) or "channel" (one per channel of each head)."""
    return "channel" if any(is_channelwise(a) for a in coefs.values()) else "head"


def summary_value(a: Coefficient) -> float:
    """One number for a coefficient in tables and plots: the scale, or the channels' mean."""
    return float(sum(a) / len(a)) if is_channelwise(a) else float(a)


def read_coefficients(path: str | Path) -> dict[HeadKey, Coefficient]:
    """Read ``{"heads": [{"layer": L, "head": H, "coefficient": a}, ...]}``; ``a`` is a number,
    or a list of head_dim numbers for per-channel scales."""
    path = Path(path)
    if not path.is_file():
        raise PearError(f"coefficients file not found: {path}")
    try:
        data = json.loads(path.read_text())
        rows = data["heads"]
        coefs = {}
        for r in rows:
            key = (r["layer"], r["head"])
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in key):
                raise PearError(f"{path}: layer and head must be integers, got {key}")
            if key in coefs:
                raise PearError(f"{path}: layer {key[0]} head {key[1]} appears twice")
            a = r["coefficient"]
            values = a if isinstance(a, list) and a else [a]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise PearError(f"{path}: coefficient for layer {key[0]} head {key[1]} is not a number "
                                "or a list of numbers, or not finite")
            coefs[key] = [float(v) for v in a] if isinstance(a, list) else float(a)
    except json.JSONDecodeError as e:
        raise PearError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError) as e:
        raise PearError(
            f'{path}: expected {{"heads": [{{"layer": L, "head": H, "coefficient": a}}, ...]}} (missing {e})'
        ) from None
    if not coefs:
        raise PearError(f"{path}: no heads listed")
    return coefs


def read_site(path: str | Path) -> str:
    """The `site` of a coefficients file (or of a folded folder's pear.json): "output" when absent."""
    try:
        site = json.loads(Path(path).read_text()).get("site", "output")
    except (OSError, ValueError, AttributeError):
        return "output"  # read_coefficients says what is wrong with the file
    return check_site(site)


def coefficients_json(coefs: Mapping[HeadKey, Coefficient], site: str = "output", **extra) -> dict:
    return {"granularity": granularity(coefs), "site": check_site(site),
            "heads": [{"layer": l, "head": h, "coefficient": a} for (l, h), a in sorted(coefs.items())], **extra}


def on_layers(coefs: dict[HeadKey, Coefficient], layers: str) -> dict[HeadKey, Coefficient]:
    """The coefficients of the heads in `layers` ("0-4+15-19", `pear.settings.parse_layers`); the
    others are left out, i.e. stay 1. Why: fitted scales act together across layers, and a subset
    of them can read differently from the whole fit (BENCHMARKS.md §5, layer groups)."""
    from ..settings import parse_layers

    keep = set(parse_layers(layers))
    out = {k: a for k, a in coefs.items() if k[0] in keep}
    if not out:
        raise PearError(f"no coefficient on layers {layers} (the file's layers: "
                        f"{', '.join(map(str, sorted({k[0] for k in coefs})))})")
    return out


def with_strength(coefs: dict[HeadKey, Coefficient], c: float) -> dict[HeadKey, Coefficient]:
    """Every scale's distance from 1 times `c`: a = 1 + c (a - 1), per head or per channel; c = 1
    leaves the coefficients as they are, c = 0 gives the base model. Why: a fit's scales can stop
    short of what they do well (BENCHMARKS.md §5, how strong), as a LoRA's weight can be dialled."""
    if not math.isfinite(c):
        raise PearError(f"strength must be a finite number, got {c}")
    return {k: [1 + c * (x - 1) for x in a] if is_channelwise(a) else 1 + c * (a - 1) for k, a in coefs.items()}


def select(coefs: dict[HeadKey, Coefficient], layers: str = "", strength: float = 1.0) -> dict[HeadKey, Coefficient]:
    """The coefficients that are folded: those of `layers` ("": all; `on_layers`) at `strength`
    (`with_strength`); `pear fold --layers --strength` and the fit settings `fold_layers`, `strength`."""
    coefs = on_layers(coefs, layers) if layers else dict(coefs)
    return with_strength(coefs, strength) if strength != 1 else coefs

