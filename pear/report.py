"""report.md and its figures for `pear run`: what was done, what it changed, how long it took.

Figures: the Δπ heatmap (`heads.png`, written by discovery through `pear.plots.heatmap`),
one bar per learned coefficient (`coefficients.png`: a flipped head, α < 0, shows as a red
bar below zero; an amplified one, α > 1, in orange), and the training loss per step with
the held-out loss before and after (`fit_loss.png`). Figures are drawn with
`matplotlib.figure.Figure` (no pyplot state) and written atomically, like `pear.plots`.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import savefig, write_text
from .objectives.anchor import SOURCES
from .recipes import DEFAULT_RECIPE, candidate_name, measured_text
from .settings import BOUNDS, DEFAULT_BOUNDS


def effect(alpha: float) -> str:
    """How a coefficient changes its head, in words (for the table and the bar colours)."""
    if alpha < 0:
        return "FLIPPED"
    if alpha == 0:
        return "removed"
    if alpha < 0.995:
        return "weakened"
    if alpha <= 1.005:
        return "unchanged"
    return "amplified"


_COLOURS = {"FLIPPED": "#d62728", "removed": "#7f7f7f", "weakened": "#1f77b4", "unchanged": "#bcbd22",
            "amplified": "#ff7f0e"}


def _model_text(r) -> str:
    """What `model/` holds, by `pear run --format`."""
    fmt = r.settings.get("format", "hf")
    if fmt == "gguf":
        return (f"`model/` holds the base GGUF file with the attention output tensors of the {r.k} re-weighted heads "
                "rescaled (re-quantised; pear.json says in which type) for llama.cpp, Ollama and LM Studio; its "
                "logits were checked against the folded model, whose numbers are those below.")
    if fmt == "peft":
        return (f"`model/` is a PEFT IA3 adapter that re-weights {r.k} attention heads at run time: "
                f'`PeftModel.from_pretrained(base_model, "{r.model_dir.name}")`; `merge_and_unload()` gives the folded '
                "weights measured below.")
    from .settings import site_of

    where = "query projection: the heads' queries" if site_of(r.settings["fit"].get("scales")) == "query" \
        else "attention output projection"
    return (f"`model/` is an ordinary checkpoint of the base model with {r.k} attention heads re-weighted (the\n"
            f"coefficients are folded into the {where}): same architecture, parameter count\n"
            f'and speed. Load it with `AutoModelForCausalLM.from_pretrained("{r.model_dir.name}")` from this folder.')


MAX_BARS = 40  # more heads than this (every head scaled): a layers x heads map of α - 1 instead of bars


def plot_coefficients(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Bar per head (rank order): coefficient α; dashed line at 1 (unchanged), solid at 0.
    With more than MAX_BARS heads, a layers x heads map of α - 1 (per-channel scales: their mean)."""
    if len(rows) > MAX_BARS:
        import torch

        from .plots import heatmap

        L, H = 1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows)
        grid = torch.zeros(L, H)
        for r in rows:
            grid[r["layer"], r["head"]] = r["coefficient"] - 1
        return heatmap(grid, [], path, title=title, label="α − 1 (%)")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    labels = [f"L{r['layer']}H{r['head']}" for r in rows]
    alphas = [r["coefficient"] for r in rows]
    kinds = [effect(a) for a in alphas]
    fig = Figure(figsize=(max(4.5, 0.42 * len(rows) + 1.5), 3.4))
    ax = fig.subplots()
    bars = ax.bar(range(len(rows)), alphas, color=[_COLOURS[k] for k in kinds])
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("coefficient α")
    ax.set_xlabel("head, by discovery rank")
    seen = list(dict.fromkeys(kinds))
    ax.legend(handles=[Patch(color=_COLOURS[k], label=k.lower()) for k in seen], fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    savefig(fig, path, dpi=120)
    return path


def plot_losses(losses: list[float], before: dict, after: dict | None, path: str | Path,
                title: str | None = None) -> Path:
    """Training loss per step (each step a fresh batch, so it is noisy; a 5-step running mean
    drawn over it) and the held-out loss before (step 0) and after (last step)."""
    import numpy as np
    from matplotlib.figure import Figure

    path = Path(path)
    steps = np.arange(1, len(losses) + 1)
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="training loss (fresh batch each step)")
    if len(losses) >= 5:
        w = 5
        mean = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], mean, color="#1f77b4", linewidth=1.8, label=f"running mean ({w} steps)")
    ax.scatter([0], [before["proxy_loss"]], color="black", zorder=3, label="held-out: base")
    if after is not None:
        ax.scatter([len(losses)], [after["proxy_loss"]], color="#d62728", zorder=3, label="held-out: learned")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("copy cross-entropy (2nd half)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    savefig(fig, path, dpi=120)
    return path


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:+.2f} %"


def render(r) -> str:
    """report.md for a `RunResult` `r` (figures referenced by file name, beside it)."""
    fs = r.settings["fit"]
    b, a = r.before, r.after
    sb, sf = r.saved["base"], r.saved["folded"]
    n_flipped = sum(1 for h in r.heads if h["coefficient"] < 0)
    shown = r.heads if r.discovery else sorted(r.heads, key=lambda h: -abs(h["coefficient"] - 1))[:MAX_BARS]
    rows = "\n".join(
        f"| {h['rank']} | {h['layer']} | {h['head']} | {_pct(h['score'])} | {h['coefficient']:.4f} | {effect(h['coefficient'])} |"
        for h in shown)
    ks = r.k_selection
    if not r.discovery:
        k_text = (f"Every head has a scale ({ks['method']}): no discovery, no K. Largest changes first "
                  f"(all {r.k} in `coefficients.json`).")
    elif ks.get("method") == "given":
        k_text = f"K = {r.k} was given (`--k {r.k}`)."
    else:
        k_text = (f"K = {r.k}, chosen from the data (`--k auto`): the knee of the {ks['positive_heads']} positive "
                  f"Δπ scores sorted in decreasing order is at rank {ks['knee']} (Kneedle: the point farthest below "
                  f"the line from the largest to the smallest positive score), clamped to {ks['clamp'][0]}..{ks['clamp'][1]}. "
                  f"Sorted positive Δπ (top 16, %): "
                  + ", ".join(f"{100 * v:.2f}" for v in ks["sorted_positive_scores"][:16]) + ".")
    bounds_note = (f"Coefficient range `--bounds {fs['bounds']}` ({BOUNDS[fs['bounds']].text}), enforced by projection "
                   "after every optimiser step.")
    if fs["bounds"] == DEFAULT_BOUNDS:
        bounds_note += (" This is the default, provisionally: unbounded fits flipped heads (α < 0) on SmolLM2 "
                        "without helping multi-document QA; which range transfers best is being decided with "
                        "`pear eval` (base vs none / nonneg / unit on the same questions, paired test).")
    secs = "\n".join(f"| {k} | {v:.1f} |" for k, v in r.seconds.items())
    vers = ", ".join(f"{k} {v}" for k, v in r.versions.items())
    loss_first = sum(r.losses[:5]) / max(1, len(r.losses[:5]))
    loss_last = sum(r.losses[-5:]) / max(1, len(r.losses[-5:]))
    v = r.verification
    return f"""# PEAR run: {r.model}

`{r.command}` — {r.seconds['total']:.0f} s in all.

{_model_text(r)}

## Proxy task: copying a random sequence (held-out batch)

{fs['eval_batch']} sequences of n = {fs['length']} random tokens, repeated; loss and accuracy on the second copy.
The batch is fixed (seed stream distinct from every training batch).

| model | proxy loss | copy accuracy |
|---|---:|---:|
| base ({r.settings['compute_dtype']}) | {b['proxy_loss']:.4f} | {b['copy_accuracy']:.4f} |
| learned coefficients ({r.settings['compute_dtype']}, hooks) | {a['proxy_loss']:.4f} | {a['copy_accuracy']:.4f} |
| base, saved dtype ({r.saved['dtype']}) | {sb['proxy_loss']:.4f} | {sb['copy_accuracy']:.4f} |
| **saved model** (`model/`, {r.saved['dtype']}, folded) | **{sf['proxy_loss']:.4f}** | **{sf['copy_accuracy']:.4f}** |

Proxy loss {100 * (sf['proxy_loss'] / sb['proxy_loss'] - 1):+.1f} % on the saved model. The proxy is the training
objective, not the goal: whether reading improves is measured with `pear eval` (multi-document QA,
KV retrieval, HotpotQA, MMLU), not here.

## Chosen heads and their coefficients

{k_text}

| rank | layer | head | Δπ | coefficient | effect |
|---:|---:|---:|---:|---:|---|
{rows}

{bounds_note} Flipped heads: {n_flipped}.

![coefficients](coefficients.png)

{"![heads](heads.png)" if r.discovery else ""}

## Fit

{_note_text(r)}Recipe `{r.settings.get('recipe')}`: objective `{fs['objective']}` {fs['objective_options'] or ''}, scales
`{fs['scales']}`{f" on layers {fs['layers']}" if fs.get('layers') else ''}{_kept_text(fs)}{f", penalty {fs['penalty']:g} x mean((α − 1)²)" if fs['penalty'] else ''}{
f", knowledge anchor {fs['anchor']:g} x KL(base ‖ scaled) on {SOURCES[fs.get('anchor_source', 'paragraphs')].text}" if fs.get('anchor') else ''}.{_objective_text(r)}
AdamW, lr {fs['lr']:g}, weight decay {fs['weight_decay']:g}, linear schedule with {fs['warmup']} warm-up steps;
{fs['steps']} steps of {fs['batch']} fresh sequences, seed {fs['seed']};
every model weight frozen. Training loss, mean of the first / last 5 steps: {loss_first:.3f} -> {loss_last:.3f}.

![training loss](fit_loss.png)

{measured_text(candidate_name(r.settings.get('recipe') or DEFAULT_RECIPE, fs), r.model, r.settings.get('recipe'))}

{_discovery_text(r)}

## Fold check

Folded vs hooked logits on a fixed input{f" ({v['compute_dtype']} arithmetic)" if v.get('compute_dtype') else ""}: max |difference| {v['max_abs_logit_diff']:.3g}
(tolerance {v['tolerance']:.3g}), argmax agreement {v['argmax_agreement']:.4f}.

## Seconds per stage

| stage | seconds |
|---|---:|
{secs}

## Versions

{vers}
"""


def _discovery_text(r) -> str:
    if not r.discovery:
        return ""
    d = r.discovery
    return (f"## Discovery\n\nMethod `{r.method}`, settings (N, n) {', '.join(f'({n}, {l})' for n, l in d['settings'])},\n"
            f"{d['seconds']:.1f} s, {d['forward_equivalents']:.1f} forward-equivalents. All scores: `heads.json`.\n")


def _note_text(r) -> str:
    """How the recipe was chosen, where the default was not the preset's own (`recipes.default_note`)."""
    note = r.settings.get("recipe_note")
    return f"Chosen by default: {note}.\n\n" if note else ""


def _kept_text(fs: dict) -> str:
    """What of the fitted scales was folded, where not all of them as fitted."""
    kept = ([f"those of layers {fs['fold_layers']} kept"] if fs.get("fold_layers") else []) + \
        ([f"each scale's distance from 1 times {fs['strength']:g}"] if fs.get("strength", 1) != 1 else [])
    return f" (folded: {', '.join(kept)})" if kept else ""


def _objective_text(r) -> str:
    b, a = r.before, r.after
    if "objective_loss" not in b:
        return ""
    return (f" Held-out objective loss (fixed batch): base {b['objective_loss']:.4f} -> learned "
            f"{a['objective_loss']:.4f}.")


def write_report(r, folder: str | Path) -> dict[str, Path]:
    """Write coefficients.png, fit_loss.png and report.md into `folder` (heads.png is discovery's)."""
    folder = Path(folder)
    figs = {
        "coefficients": plot_coefficients(r.heads, folder / "coefficients.png",
                                          title=f"{r.model}: learned coefficients ({BOUNDS[r.settings['fit']['bounds']].text})"),
        "fit_loss": plot_losses(r.losses, r.before, r.after, folder / "fit_loss.png", title=f"{r.model}: fit"),
    }
    write_text(folder / "report.md", render(r))
    figs["report"] = folder / "report.md"
    return figs
