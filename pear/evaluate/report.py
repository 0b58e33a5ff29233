"""The terminal table, the Markdown table and the U-curve plot of a results dict, and
`save_results`, which writes them beside the results JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import savefig, write_gzip, write_text


def _fmt_acc(m: dict | None) -> str:
    if not m or m.get("accuracy") is None:
        return "-"
    lo, hi = m["ci95"]
    skip = f" skip {m['skipped']}" if m.get("skipped") else ""
    return f"{m['accuracy']:.3f} [{lo:.2f},{hi:.2f}] n={m['n']}{skip}"


def _fmt_cmp(c: dict | None) -> str:
    if not c or c.get("n", 0) == 0:
        return ""
    return f" {c['diff']:+.3f} p={c['p_mcnemar']:.2g}"


def format_table(results: dict) -> str:
    """One row per task and condition, one column per model. For the second and later models
    the paired difference to the first and the exact McNemar p-value follow the accuracy."""
    labels = [m["label"] for m in results["models"]]
    rows = [["task", "gold pos"] + labels]
    for name, t in results["tasks"].items():
        for c in t["conditions"]:
            row = [name, c]
            for lab in labels:
                cell = _fmt_acc(t["models"].get(lab, {}).get(c))
                if lab in t["paired"]:
                    cell += _fmt_cmp(t["paired"][lab]["conditions"].get(c))
                row.append(cell)
            rows.append(row)
        for lab in labels:
            if "macro_accuracy" in t["models"].get(lab, {}):
                macro = [t["models"].get(x, {}).get("macro_accuracy", float("nan")) for x in labels]
                rows.append([name, "macro"] + [f"{v:.3f}" for v in macro])
                break
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _p(p: float) -> str:
    """An exact p-value as a paper prints it: 0.25, 3.1e−05 -> 3.1e−5, 0 -> <1e−300 (below double precision)."""
    if p == 0:
        return "<1e−300"
    m, _, e = f"{p:.2g}".partition("e")
    return f"{m}e−{int(e[1:])}" if e else m


def format_markdown(results: dict) -> str:
    """The results as a Markdown table (for a README or a paper's appendix), one row per task and
    condition: each model's accuracy and, for the second and later models, the paired difference
    to the first in points with its 95 % bootstrap interval and the exact McNemar p. Rows over
    all conditions are bold; a model with no result there gets '–'."""
    labels = [m["label"] for m in results["models"]]
    first, rest = labels[0], labels[1:]
    head = ["task", "gold pos", first] + [x for lab in rest for x in (lab, f"{lab} − {first} (points), p")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in results["tasks"].items():
        rows = [(c, c == "all") for c in t["conditions"]]
        if any("macro_accuracy" in t["models"].get(lab, {}) for lab in labels):
            rows.append(("macro", False))
        for i, (c, bold) in enumerate(rows):
            cells = [name if i == 0 else "", c]
            for lab in labels:
                m = t["models"].get(lab, {})
                acc = m.get("macro_accuracy") if c == "macro" else (m.get(c) or {}).get("accuracy")
                cells.append("–" if acc is None else f"{acc:.3f}")
                if lab == first:
                    continue
                d = t.get("paired", {}).get(lab, {}).get("conditions", {}).get(c)
                if c == "macro" or not d or not d.get("n"):
                    cells.append("–" if c != "macro" else "")
                    continue
                lo, hi = d["ci95"]
                cells.append(f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={_p(d['p_mcnemar'])}"
                             .replace("-", "−").replace("p=<", "p<"))
            if bold:
                cells = [f"**{x}**" if x and j > 0 else x for j, x in enumerate(cells)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _yerr(ys: list[float], ms: list[dict]) -> list[list[float]]:
    """Error bar lengths below and above; 0 where there is no interval (nothing scored)."""
    lo = [max(0.0, y - m["ci95"][0]) if m["ci95"] else 0.0 for y, m in zip(ys, ms)]
    hi = [max(0.0, m["ci95"][1] - y) if m["ci95"] else 0.0 for y, m in zip(ys, ms)]
    return [lo, hi]


def plot_results(results: dict, path) -> Path | None:
    """Accuracy vs gold position, one line per model with 95 % CI error bars, one panel per
    positional task; non-positional tasks as grouped bars in a last panel. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m["label"] for m in results["models"]]
    pos = [(n, t) for n, t in results["tasks"].items() if t["positional"]]
    other = [(n, t) for n, t in results["tasks"].items() if not t["positional"]]
    n_panels = len(pos) + (1 if other else 0)
    if n_panels == 0:
        return None
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
    axes = axes[0]
    for ax, (name, t) in zip(axes, pos):
        conds = [c for c in t["conditions"] if c != "all"]
        xs = [int(c) for c in conds]
        for lab in (x for x in labels if x in t["models"]):  # a label missing here: no line
            ms = [t["models"][lab][c] for c in conds]
            ys = [m["accuracy"] if m["accuracy"] is not None else float("nan") for m in ms]
            err = _yerr(ys, ms)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=lab, color=f"C{labels.index(lab)}")
        ax.set_title(name)
        ax.set_xlabel("gold position")
        ax.set_ylabel(t["metric"])
        ax.set_xticks(xs)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if other:
        ax = axes[-1]
        width = 0.8 / max(1, len(labels))
        for j, lab in enumerate(labels):
            ms = [t["models"].get(lab, {}).get(t["conditions"][-1], {"accuracy": None, "ci95": None}) for _, t in other]
            ys = [m["accuracy"] or 0 for m in ms]
            err = _yerr(ys, ms)
            ax.bar([i + j * width for i in range(len(other))], ys, width, yerr=err, capsize=3, label=lab, color=f"C{j}")
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(other))])
        ax.set_xticklabels([n for n, _ in other])
        ax.set_ylim(0, 1)
        ax.set_title("no gold position")
        ax.grid(alpha=0.3, axis="y")
    legend = {}  # every label once, also one that only some panels have (a task with a missing part)
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    axes[0].legend(legend.values(), legend.keys(), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_results(results: dict, out) -> dict[str, Path]:
    """Write results JSON (+ .samples.jsonl.gz when samples are present, + a .md table and a
    .png plot), each atomically. Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    samples = results.pop("samples", None)
    written = {}
    if samples is not None:
        sp = out.with_name(out.stem + ".samples.jsonl.gz")
        write_gzip(sp, (json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        results["samples_file"] = sp.name
        written["samples"] = sp
    write_text(out, json.dumps(results, indent=1) + "\n")
    written["results"] = out
    written["table"] = write_text(out.with_suffix(".md"), format_markdown(results) + "\n")
    png = plot_results(results, out.with_suffix(".png"))
    if png is not None:
        written["plot"] = png
    return written
