"""Figures. Built with `matplotlib.figure.Figure` (no pyplot, so no global backend is touched:
safe headless and inside notebooks) and written atomically (temporary file, then rename)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .atomic import savefig


def heatmap(scores: torch.Tensor, top: Iterable[tuple[int, int]], path: str | Path, title: str | None = None,
            label: str = "Δπ (%)") -> Path:
    """Layers x heads heatmap of `scores` (L, H) in percent: diverging colours centred at 0
    (red = positive), the heads in `top` outlined in black. Returns `path` (a PNG)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    s = 100 * scores.detach().float().cpu()
    L, H = s.shape
    # each side of 0 gets its own full colour range (the colour bar shows the scales), so a
    # few strongly negative heads do not wash out the suppression heads we are looking for
    lo, hi = min(float(s.min()), -1e-6), max(float(s.max()), 1e-6)
    fig = Figure(figsize=(max(4.0, 0.45 * H + 2.5), max(3.0, 0.28 * L + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(s.numpy(), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, lo, hi), aspect="auto",
                   interpolation="nearest", origin="lower")
    for l, h in top:
        ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.8))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    fig.colorbar(im, ax=ax, label=label, fraction=0.08)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    savefig(fig, path, dpi=120)
    return path
