"""A discovery result: every head's Δπ, how it was obtained, and heads.json I/O."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_text
from ..errors import PearError

HeadKey = tuple[int, int]  # (layer, head)


@dataclass
class DiscoveryResult:
    """Every head's Δπ and how it was obtained. `scores` (L, H) fp32; rank 1 = most suppressive."""

    scores: torch.Tensor
    method: str
    settings: list[tuple[int, int]]
    seed: int
    seconds: float
    forward_equivalents: float
    model_spec: str | None = None
    k: int = 10
    exact: torch.Tensor | None = None  # (L, H) bool: score is an exact mediation score
    estimates: torch.Tensor | None = None  # (L, H) first-order estimates ("fast")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = self.scores.float().cpu()
        if self.exact is None:
            self.exact = torch.full(self.scores.shape, self.method == "exact", dtype=torch.bool)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def ranking(self) -> list[HeadKey]:
        """All heads, rank 1 first: descending score; exactly scored heads before estimated
        ones (for "fast": the re-checked top M outrank heads known only to first order)."""
        from ..heads import rank

        return rank(self.scores, self.exact)

    def top(self, k: int | None = None) -> list[HeadKey]:
        """The `k` (default: self.k) most suppressive heads, by descending score."""
        return self.ranking()[: self.k if k is None else k]

    def to_dict(self) -> dict:
        rank = {key: i + 1 for i, key in enumerate(self.ranking())}
        heads = []
        for (l, h) in self.ranking():
            est = None if self.estimates is None else float(self.estimates[l, h])
            heads.append({"layer": l, "head": h, "score": float(self.scores[l, h]), "rank": rank[(l, h)],
                          "exact": bool(self.exact[l, h]), "estimate": est})
        return {"model": self.model_spec, "method": self.method, "settings": [list(s) for s in self.settings],
                "seed": self.seed, "seconds": round(self.seconds, 3),
                "forward_equivalents": round(self.forward_equivalents, 3), "n_layers": self.n_layers,
                "n_heads": self.n_heads, "top_k": self.k, **self.extra, "heads": heads}

    def save(self, path: str | Path, plot: bool = True) -> Path:
        """Write heads.json (atomically) and, beside it, the heatmap PNG (same stem)."""
        path = Path(path)
        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        if plot:
            from ..plots import heatmap

            title = f"Δπ when mean-ablated ({self.method}; {self.model_spec or 'model'}); top {self.k} outlined"
            heatmap(self.scores, self.top(), path.with_suffix(".png"), title=title)
        return path


def read_heads(path: str | Path) -> DiscoveryResult:
    """Read a heads.json written by `DiscoveryResult.save`; PearError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise PearError(f"heads file not found: {path}")
    try:
        d = json.loads(path.read_text())
        L, H = int(d["n_layers"]), int(d["n_heads"])
        scores = torch.full((L, H), float("nan"))
        exact = torch.zeros(L, H, dtype=torch.bool)
        estimates = torch.full((L, H), float("nan"))
        has_est = False
        for r in d["heads"]:
            l, h = r["layer"], r["head"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (l, h)) or not (0 <= l < L and 0 <= h < H):
                raise PearError(f"{path}: bad head entry layer={l!r} head={h!r} for {L} layers x {H} heads")
            if not math.isnan(scores[l, h]):
                raise PearError(f"{path}: layer {l} head {h} appears twice")
            scores[l, h] = float(r["score"])
            exact[l, h] = bool(r.get("exact", d["method"] == "exact"))
            if r.get("estimate") is not None:
                estimates[l, h] = float(r["estimate"])
                has_est = True
        if torch.isnan(scores).any():
            raise PearError(f"{path}: {int(torch.isnan(scores).sum())} of {L * H} heads have no score")
        known = {"model", "method", "settings", "seed", "seconds", "forward_equivalents", "n_layers", "n_heads",
                 "top_k", "heads"}
        return DiscoveryResult(
            scores=scores, method=str(d["method"]), settings=[tuple(int(v) for v in s) for s in d["settings"]],
            seed=int(d["seed"]), seconds=float(d["seconds"]), forward_equivalents=float(d["forward_equivalents"]),
            model_spec=d.get("model"), k=int(d.get("top_k", 10)), exact=exact,
            estimates=estimates if has_est else None, extra={k: v for k, v in d.items() if k not in known})
    except json.JSONDecodeError as e:
        raise PearError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PearError(f"{path}: not a pear heads file (expected the keys of `pear discover` output; "
                        f"problem: {type(e).__name__} {e})") from None
