"""The study's figures and table: loss curves, accuracy by gold position (one panel per
position embedding), discovery heat maps side by side, and the Markdown table.

Figures use `matplotlib.figure.Figure` (no pyplot state) and are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import savefig

COLOURS = {"base": "tab:grey", "pear": "tab:red"}


def plot_training(records: dict[str, dict], path) -> Path:
    """Training loss (moving average over 20 steps) and held-out loss, every model on one axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (arch, r) in enumerate(records.items()):
        c = f"C{i}"
        y = np.asarray(r["losses"], dtype=float)
        w = min(20, len(y))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(y) + 1), smooth, color=c, lw=1.2, label=f"{arch} ({r['class']}) train")
        h = r.get("heldout") or []
        ax.plot([p["step"] for p in h], [p["loss"] for p in h], "o--", color=c, ms=3, lw=0.8, label=f"{arch} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("training loss, same data, tokens and seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return savefig(fig, Path(path), dpi=120)


def plot_positions(summary: dict, path) -> Path:
    """Rows: tasks; columns: position embeddings; base vs PEAR accuracy by gold position, 95 % CIs."""
    from matplotlib.figure import Figure

    archs = list(summary["archs"])
    tasks = summary["tasks"]
    fig = Figure(figsize=(3.6 * len(archs), 2.8 * len(tasks)))
    axes = np.atleast_2d(fig.subplots(len(tasks), len(archs), squeeze=False))
    for j, arch in enumerate(archs):
        for i, task in enumerate(tasks):
            ax = axes[i, j]
            t = summary["archs"][arch]["tasks"].get(task)
            if t is None:
                ax.set_visible(False)
                continue
            conds = [c for c in t["by_position"]]
            x = [int(c) for c in conds]
            for dx, lab in ((-0.06, "base"), (0.06, "pear")):  # side by side, so equal values stay visible
                ys = [t["by_position"][c][lab]["accuracy"] for c in conds]
                lo = [t["by_position"][c][lab]["ci95"][0] for c in conds]
                hi = [t["by_position"][c][lab]["ci95"][1] for c in conds]
                err = [[max(0.0, y - a) for y, a in zip(ys, lo)], [max(0.0, b - y) for y, b in zip(ys, hi)]]
                ax.errorbar([v + dx * max(1, x[-1] - x[0]) / 4 for v in x], ys, yerr=err, marker="o", ms=3, capsize=2, color=COLOURS[lab],
                            label="PEAR" if lab == "pear" else "base")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{arch} ({summary['archs'][arch]['class']})", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{task}\naccuracy", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("gold position", fontsize=8)
            if i == 0 and j == len(archs) - 1:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return savefig(fig, Path(path), dpi=110)


def plot_heads(discoveries: dict[str, tuple], path) -> Path:
    """discoveries: arch -> (scores (L, H) tensor, selected heads). Δπ in %, red = suppresses copying."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(discoveries)
    fig = Figure(figsize=(3.8 * n, 3.6))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (arch, (scores, top)) in zip(axes, discoveries.items()):
        s = 100 * scores.detach().float().cpu().numpy()
        L, H = s.shape
        norm = TwoSlopeNorm(0.0, min(float(s.min()), -1e-6), max(float(s.max()), 1e-6))
        im = ax.imshow(s, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest", origin="lower")
        for l, h in top:
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
        ax.set_title(f"{arch}: K = {len(top)}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax, label="Δπ (%)", fraction=0.08)
    fig.tight_layout()
    return savefig(fig, Path(path), dpi=120)


def _p(p) -> str:
    return "—" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def markdown_table(summary: dict) -> str:
    """Position embedding x task: base and PEAR accuracy (all positions), Δ in points with its
    bootstrap 95 % CI, McNemar p; then the same by gold position."""
    lines = ["| position embedding | task | n | base | PEAR | Δ (points) [95 % CI] | McNemar p | bootstrap p |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for arch, a in summary["archs"].items():
        for task, t in a["tasks"].items():
            lo, hi = t["ci95"]
            lines.append(f"| {arch} | {task} | {t['n']} | {100 * t['base']:.1f} | {100 * t['pear']:.1f} | "
                         f"{100 * t['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {_p(t['p_mcnemar'])} | "
                         f"{_p(t['p_bootstrap'])} |")
    lines += ["", "By gold position (base → PEAR accuracy, %; * McNemar p < 0.05):", ""]
    for arch, a in summary["archs"].items():
        for task, t in a["tasks"].items():
            cells = []
            for c, v in t["by_position"].items():
                star = "*" if v["p_mcnemar"] is not None and v["p_mcnemar"] < 0.05 else ""
                cells.append(f"{c}: {100 * v['base']['accuracy']:.0f}→{100 * v['pear']['accuracy']:.0f}{star}")
            lines.append(f"- {arch} / {task}: " + ", ".join(cells))
    lines += ["", "| position embedding | class | parameters | final train loss | held-out loss | K | "
              "proxy copy accuracy base → PEAR | mean α (per-channel scales: over channels) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for arch, a in summary["archs"].items():
        tr, pr = a.get("train") or {}, a.get("pear") or {}
        coefs = [x for v in (pr.get("coefficients") or {}).values() for x in (v if isinstance(v, list) else [v])]
        mean_a = f"{sum(coefs) / len(coefs):.3f}" if coefs else "—"
        before, after = pr.get("before", {}).get("copy_accuracy"), pr.get("after", {}).get("copy_accuracy")
        proxy = f"{before:.3f} → {after:.3f}" if before is not None and after is not None else "—"
        held = (tr.get("heldout") or [{}])[-1].get("loss")
        lines.append(f"| {arch} | {a['class']} | {tr.get('parameters', 0) / 1e6:.1f}M | {tr.get('final_loss', '—')} | "
                     f"{'—' if held is None else f'{held:.3f}'} | {pr.get('k', '—')} | {proxy} | {mean_a} |")
    rows = [(arch, (a.get("train") or {}).get("induction")) for arch, a in summary["archs"].items()]
    if any(ind for _, ind in rows):  # pear.study.induction: did the base models learn to copy at all?
        lines += ["", "A 100-token span shown twice to the base model (`pear.study.induction`): next-token loss on the "
                  "first → second showing (nats), top-1 accuracy on the second:", "",
                  "| position embedding | random ids | random ids seen in the text | training text |", "|---|---|---|---|"]
        for arch, ind in rows:
            cell = lambda k: (f"{ind[k]['loss_first']:.2f} → {ind[k]['loss_second']:.2f}, {ind[k]['top1_second']:.2f}"  # noqa: E731
                              if ind and k in ind else "—")
            lines.append(f"| {arch} | {cell('random')} | {cell('random-seen')} | {cell('text')} |")
    return "\n".join(lines) + "\n"
