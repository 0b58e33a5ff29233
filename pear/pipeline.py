"""`pear run`: discover -> fit -> fold -> verify -> save, in one command (and `pear.run(...)`).

    pear run [--model SPEC] [--out DIR] [--k auto|K] [--method fast|exact]

DIR receives ``model/`` (an ordinary Hugging Face checkpoint with ``pear.json`` and a model
card), ``heads.json`` (+ ``heads.png``, the Δπ heatmap), ``coefficients.json``,
``report.md``, ``coefficients.png`` and ``fit_loss.png``. DIR is written atomically: it
appears complete or not at all.

Dtypes. Discovery and fitting run in ``--dtype`` (auto = what the hardware computes fastest,
`pear.hardware`: bf16 on GPUs and on CPUs with native bf16, fp32 on CPUs without it, where
emulated bf16 is several times slower; probabilities, losses and the coefficients stay fp32). The saved model is folded in ``--save-dtype`` (auto = the checkpoint's own dtype:
fp32 for a GGUF file, whose dequantised weights are fp32 — the faithful copy of the base
model — and usually bf16 for hub checkpoints), so folding adds no rounding beyond what the
base model already has. When the two differ the model is loaded again in the saved dtype,
after the compute copy is freed.

Resume: discovery keeps the state of its exact re-runs at ``DIR.discover-M.ckpt`` and the fit a
checkpoint at ``DIR.fit.ckpt`` (beside DIR) while they run; after Ctrl-C, the same command resumes
from them (the clean passes are re-run: they are seeded).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from .errors import PearError
from .provenance import versions
from .export.formats import check_format, save_gguf, save_peft
from .export.scales import snapshot_site
from .dtypes import checkpoint_dtype, compute_dtype, dtype_name
from .fit import FitSettings, fit, heldout_batch, metrics_text, proxy_metrics
from .folding import AtomicDir, HeadKey, granularity, save_checkpoint, summary_value, verify_fold
from .heads import all_heads, find_heads, parse_k, top_m_plan
from .families import resolve
from .loading import load_model, parse_dtype, resolve_spec

SAVERS = {"hf": save_checkpoint, "gguf": save_gguf, "peft": save_peft}  # how `model/` is written, by --format


@dataclass
class RunResult:
    """What `pear run` made; the same fields as report.md."""

    out: Path
    model_dir: Path
    heads_path: Path
    coefficients_path: Path
    report_path: Path
    figures: dict[str, Path]  # heatmap, coefficients, fit_loss
    model: str  # the base model spec
    method: str  # discovery method
    k: int
    k_selection: dict
    heads: list[dict]  # rank, layer, head, score (Δπ), coefficient; rank order
    coefficients: dict[HeadKey, float]
    before: dict[str, float]  # held-out proxy loss / copy accuracy, base model (compute dtype)
    after: dict[str, float]  # same batch, learned coefficients through hooks (compute dtype)
    saved: dict  # the same metrics on the saved weights: {"dtype", "base", "folded"}
    verification: dict  # fold check (folded vs hooked logits)
    losses: list[float]  # training loss per step
    seconds: dict[str, float]  # per stage, and "total"
    versions: dict[str, str]
    settings: dict  # fit settings, discovery settings, dtypes, seed
    command: str = ""
    discovery: dict = field(default_factory=dict)  # seconds, forward-equivalents, settings

    def summary(self) -> str:
        return (f"{self.k} heads re-weighted; {metrics_text(self.before, self.after)}; "
                f"{self.seconds['total']:.0f} s; saved {self.out}")




def default_out(spec: str | None) -> Path:
    """runs/<model name>-pear, e.g. runs/smollm2-135m-pear."""
    ms = resolve_spec(spec)
    name = Path(ms.gguf_file).stem if ms.kind == "gguf" else Path(ms.spec.rstrip("/")).name
    return Path("runs") / f"{name}-pear"


class _Stages:
    """Stage headers on stderr ("[2/5] discover") and wall-clock seconds per stage."""

    def __init__(self, names: list[str], progress: bool):
        self.names, self.progress, self.seconds = names, progress, {}
        self.t_start = time.perf_counter()

    def __call__(self, name: str, note: str = ""):
        stages = self

        class _Ctx:
            def __enter__(self):
                if stages.progress:
                    i = stages.names.index(name) + 1
                    print(f"pear run [{i}/{len(stages.names)}] {name}{' ' + note if note else ''}", file=sys.stderr)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stages.seconds[name] = round(stages.seconds.get(name, 0.0) + time.perf_counter() - self.t, 2)

        return _Ctx()

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)


def run(model: str | None = None, out: str | Path | None = None, *, k: int | str | None = None, method: str = "fast",
        settings: FitSettings | None = None, recipe: str | None = None,
        discovery_settings=None, top_m: int | None = None, dtype: str = "auto",
        save_dtype: str = "auto", device: str = "auto", device_map=None, force: bool = False, restart: bool = False,
        progress: bool = True, data_dir=None, command: str | None = None, format: str = "hf",
        recipe_note: str | None = None, **fit_overrides) -> RunResult:
    """Discover, fit, fold, verify and save, like `pear run`. Returns a `RunResult` (None on the
    ranks other than 0 of a data-parallel run).

    model: spec (folder, hub id, .gguf, preset; default smollm2-135m). out: the folder to
    create (default runs/<model>-pear; must be empty or absent unless force). k: int or
    "auto" (default: the recipe's). method: discovery "fast" or "exact". recipe: a name in
    `pear.recipes` (default `default_recipe(model)`: the preset's confirmed recipe, else
    DEFAULT_RECIPE), used when `settings` is None. The fit is
    described once: either `settings` (a `FitSettings`, taken as it is) or keywords of
    `FitSettings` on top of the recipe (e.g. ``steps=60, batch=20, lr=5e-3, bounds="unit",
    seed=1``); both at once is an error, so nothing overrides the settings object silently.
    With scales "all-heads" or "channels" every head is scaled and discovery is skipped (its
    scores choose nothing).
    discovery_settings: proxy (N, n) settings for discovery (default: the paper's four);
    format: what `model/` holds: "hf" (a HF folder), "gguf" (the base GGUF re-weighted; needs a GGUF
    base) or "peft" (an IA3 adapter).
    top_m: heads re-scored exactly by "fast" discovery (default `pear.heads.top_m_plan`).
    recipe_note: how the recipe was chosen, for report.md (`pear.recipes.default_note`; set here when
    the default is taken, passed by `pear run` when --recipe is not given).
    """
    from .recipes import check_recipe_data, default_note, default_recipe, get_recipe, recipe_settings

    t_total = time.perf_counter()
    from .preflight import check_discovery_settings, check_k, check_out_folder
    from .proxy import parse_settings

    preset_default = recipe is None and settings is None
    if preset_default:
        recipe, recipe_note = default_recipe(model, device), default_note(model, device)
    if recipe_note:
        print(f"pear: {recipe_note}", file=sys.stderr)
    rec = get_recipe(recipe)
    recipe_name = recipe or "custom"
    k = parse_k(str(k if k is not None else rec.k))
    out = Path(out) if out is not None else default_out(model)
    check_out_folder(out, force)
    if format == "gguf" and save_dtype not in ("auto", "fp32"):
        raise PearError("--format gguf compares the written file with the folded model in fp32; "
                        "leave --save-dtype auto")
    if isinstance(discovery_settings, str) or discovery_settings is None:
        discovery_settings = parse_settings(discovery_settings)
    check_discovery_settings(discovery_settings)
    if top_m is not None and top_m < 1:
        raise PearError(f"--top-m must be >= 1, got {top_m}")
    check_k(model, k, top_m=top_m)
    if settings is not None and fit_overrides:
        raise PearError(f"pear.run: pass the fit either as settings=FitSettings(...) or as keywords "
                        f"({', '.join(sorted(fit_overrides))}), not both")
    fs = settings if settings is not None else recipe_settings(recipe, **fit_overrides)
    seed = fs.seed
    check_format(format, model, fs.site)
    check_recipe_data(fs, data_dir, model, recipe, by_default=preset_default)
    cdtype = parse_dtype(compute_dtype(dtype, device))
    stages = _Stages(["load"] + ([] if fs.all_heads else ["discover"]) + ["fit", "fold + verify", "save"], progress)

    with stages("load", f"{model or 'smollm2-135m'} ({dtype_name(cdtype)})"):
        loaded = load_model(model, dtype=cdtype, device=device, device_map=device_map)
        spec = loaded.spec.spec
    resolve(loaded.model).site_projs(fs.site)  # a family the scales cannot act on: one line now, not after discovery

    estimate = None
    if progress and fs.objective == "copy" and not fs.all_heads:  # what the long part will cost, from one measured step
        from .estimate import estimate_run

        on_cpu = next(loaded.model.parameters()).device.type == "cpu"
        m_guess = top_m_plan(k, method, on_cpu, top_m)[0]
        estimate = estimate_run(loaded.model, loaded.tokenizer, fs, discovery_settings, method=method,
                                top_m=m_guess, seed=seed)
        print(estimate.line(), file=sys.stderr)

    disc = None
    if fs.all_heads:
        heads, scores, evidence = all_heads(loaded.model, fs.layers), {}, {"method": f"every head ({fs.scales})"}
    else:
        with stages("discover", f"({method})"):
            disc, heads, scores, evidence = find_heads(
                loaded.model, loaded.tokenizer, k, method=method, top_m=top_m, settings=discovery_settings,
                seed=seed, progress=progress, model_spec=spec, checkpoint=lambda m: Path(f"{out}.discover-{m}.ckpt"))

    ckpt = Path(str(out) + ".fit.ckpt")
    with stages("fit", f"({len(heads)} heads, {fs.steps} steps x {fs.batch} sequences, bounds {fs.bounds})"):
        fr = fit(loaded.model, loaded.tokenizer, heads, fs, checkpoint=ckpt, restart=restart, progress=progress,
                 model_spec=spec, scores=scores, k_selection=evidence, data_dir=data_dir)
    from .distributed import is_main  # data-parallel (torchrun / accelerate launch):
    if not is_main():  # rank 0 alone folds, verifies and saves
        return None

    with stages("fold + verify"):
        sdtype = checkpoint_dtype(model) if save_dtype == "auto" else parse_dtype(save_dtype)
        bar = stages.bar(4, "fold + verify")
        if sdtype != next(loaded.model.parameters()).dtype:
            del loaded
            gc.collect()
            loaded = load_model(model, dtype=sdtype, device=device, device_map=device_map)
        bar.update(1)
        heldout = heldout_batch(loaded.model, loaded.tokenizer, fs)
        saved_base = proxy_metrics(loaded.model, heldout, fs.micro_batch)
        bar.update(1)
        restore = snapshot_site(loaded.model, fs.site) if format == "peft" else None  # the adapter needs the base
        verification = verify_fold(loaded.model, fr.coefficients, site=fs.site)  # folds in place, or raises
        bar.update(1)
        saved_folded = proxy_metrics(loaded.model, heldout, fs.micro_batch)
        if restore:
            restore()
        bar.update(1)
        bar.close()

    rows = [{"rank": i + 1, "layer": l, "head": h, "score": scores.get((l, h)),
             "coefficient": summary_value(fr.coefficients[(l, h)])} for i, (l, h) in enumerate(fr.heads)]
    result = RunResult(
        out=out, model_dir=out / "model", heads_path=out / "heads.json", coefficients_path=out / "coefficients.json",
        report_path=out / "report.md",
        figures={"heatmap": out / "heads.png", "coefficients": out / "coefficients.png", "fit_loss": out / "fit_loss.png"},
        model=spec, method=method, k=len(fr.heads), k_selection=evidence, heads=rows, coefficients=fr.coefficients,
        before=fr.before, after=fr.after,
        saved={"dtype": dtype_name(sdtype), "base": saved_base, "folded": saved_folded},
        verification=verification.as_dict(), losses=fr.losses, seconds={}, versions=versions(),
        settings={"fit": fs.as_dict(), "compute_dtype": fr.dtype, "save_dtype": dtype_name(sdtype),
                  "seed": seed, "k": k, "method": method, "recipe": recipe_name, "format": format,
                  **({"recipe_note": recipe_note} if recipe_note else {}),
                  **({"estimate": estimate.as_dict()} if estimate else {})},
        command=(command or _command(model, out, k, method, fs, dtype, save_dtype, discovery_settings, top_m)
                 + (f" --format {format}" if format != "hf" and command is None else "")),
        discovery={} if disc is None else {"seconds": round(disc.seconds, 2),
                                           "forward_equivalents": round(disc.forward_equivalents, 2),
                                           "settings": [list(s) for s in disc.settings]},
    )

    from .report import write_report

    with stages("save", str(out)):
        bar = stages.bar(4, "save")
        with AtomicDir(out, force) as tmp:
            save = SAVERS[format]
            save(loaded, fr.coefficients, tmp / "model", verification=verification, site=fs.site, extra={
                "pear_run": {"recipe": recipe_name, "objective": fs.objective,
                             "scales": fs.scales, "granularity": granularity(fr.coefficients),
                             "method": None if disc is None else method, "k": len(fr.heads),
                             "k_selection": evidence["method"],
                             "bounds": fs.bounds, "fit_settings": fs.as_dict(), "compute_dtype": fr.dtype,
                             "heldout_proxy": {"base": saved_base, "folded": saved_folded}}})
            bar.update(1)
            if disc is not None:
                disc.save(tmp / "heads.json")  # + heads.png
            bar.update(1)
            fr.save(tmp / "coefficients.json")
            bar.update(1)
            result.seconds = {**stages.seconds, "save": round(time.perf_counter() - stages.t_start
                                                               - sum(stages.seconds.values()), 2)}
            result.seconds["total"] = round(time.perf_counter() - t_total, 2)
            write_report(result, tmp)
            bar.update(1)
        bar.close()
    ckpt.unlink(missing_ok=True)
    result.seconds["total"] = round(time.perf_counter() - t_total, 2)
    return result


def _command(model, out, k, method, fs: FitSettings, dtype, save_dtype, discovery_settings, top_m) -> str:
    """The `pear run` command line that reproduces this run (defaults left out)."""
    d = FitSettings()
    parts = ["pear run"]
    if model:
        parts.append(f"--model {model}")
    parts += [f"--out {out}", f"--k {k}", f"--method {method}"]
    if discovery_settings:
        ds = discovery_settings if isinstance(discovery_settings, str) else ",".join(f"{n}x{l}" for n, l in discovery_settings)
        parts.append(f"--discovery-settings {ds}")
    if top_m is not None:
        parts.append(f"--top-m {top_m}")
    for name, flag in [("bounds", "--bounds"), ("steps", "--steps"), ("batch", "--batch"), ("length", "--length"),
                       ("lr", "--lr"), ("eval_batch", "--eval-batch"), ("seed", "--seed"), ("objective", "--objective"),
                       ("scales", "--scales"), ("layers", "--layers"), ("penalty", "--penalty"),
                       ("anchor", "--anchor"), ("anchor_source", "--anchor-source"), ("fold_layers", "--fold-layers"),
                       ("strength", "--strength")]:
        if getattr(fs, name) != getattr(d, name):
            parts.append(f"{flag} {getattr(fs, name)}")
    parts += [f"--objective-option {k}={v}" for k, v in fs.objective_options.items()]
    if dtype != "auto":
        parts.append(f"--dtype {dtype}")
    if save_dtype != "auto":
        parts.append(f"--save-dtype {save_dtype}")
    return " ".join(parts)
