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

import argparse
import dataclasses
import functools
import gc
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import AtomicDir, add_format_arg, save_checkpoint, verify_fold
from .errors import PearError
from .export.formats import check_format, save_gguf, save_peft
from .export.scales import snapshot_out_projs
from .fit import (K_AUTO_RANGE, FitSettings, add_fit_args, all_heads, compute_dtype, fit, heldout_batch, k_from_args,
                  parse_k, proxy_metrics, select_heads, settings_from_args)
from .loading import DTYPES, load_model, parse_dtype, resolve_spec
from .recipes import DEFAULT_RECIPE
from .scaling import HeadKey, granularity, summary_value

SAVERS = {"hf": save_checkpoint, "gguf": save_gguf, "peft": save_peft}  # how `model/` is written, by --format
CPU_TOP_M = 16  # fast discovery on CPU with --k auto: heads re-scored exactly at first (see run())


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
        b, a = self.before, self.after
        return (f"{self.k} heads re-weighted; held-out proxy loss {b['proxy_loss']:.3f} -> {a['proxy_loss']:.3f}, "
                f"copy accuracy {b['copy_accuracy']:.3f} -> {a['copy_accuracy']:.3f}; "
                f"{self.seconds['total']:.0f} s; saved {self.out}")


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"pear": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def default_out(spec: str | None) -> Path:
    """runs/<model name>-pear, e.g. runs/smollm2-135m-pear."""
    ms = resolve_spec(spec)
    name = Path(ms.gguf_file).stem if ms.kind == "gguf" else Path(ms.spec.rstrip("/")).name
    return Path("runs") / f"{name}-pear"


def _native_dtype(spec) -> torch.dtype:
    """The dtype `load_model(dtype="auto")` gives: fp32 for GGUF, else the config's dtype."""
    ms = resolve_spec(spec)
    if ms.gguf_file:
        return torch.float32
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ms.path)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return DTYPES.get(str(d).replace("torch.", ""), torch.float32)


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
        bounds: str | None = None, settings: FitSettings | None = None, recipe: str | None = None,
        discovery_settings=None, top_m: int | None = None, seed: int | None = None, dtype: str = "auto",
        save_dtype: str = "auto", device: str = "auto", device_map=None, force: bool = False, restart: bool = False,
        progress: bool = True, data_dir=None, command: str | None = None, format: str = "hf",
        **fit_overrides) -> RunResult:
    """Discover, fit, fold, verify and save, like `pear run`. Returns a `RunResult` (None on the
    ranks other than 0 of a data-parallel run).

    model: spec (folder, hub id, .gguf, preset; default smollm2-135m). out: the folder to
    create (default runs/<model>-pear; must be empty or absent unless force). k: int or
    "auto" (default: the recipe's). method: discovery "fast" or "exact". recipe: a name in
    `pear.recipes` (default its DEFAULT_RECIPE), used when `settings` is None; settings /
    fit_overrides: `FitSettings` (e.g. ``steps=60, batch=20, lr=5e-3``); bounds and seed, when
    given, override those in settings. With scales "all-heads" or "channels" every head is
    scaled and discovery is skipped (its scores choose nothing).
    discovery_settings: proxy (N, n) settings for discovery (default: the paper's four);
    format: what `model/` holds: "hf" (a HF folder), "gguf" (the base GGUF re-weighted; needs a GGUF
    base) or "peft" (an IA3 adapter).
    top_m: heads re-scored exactly by "fast" discovery (default max(4k, 32); for k="auto", 32,
    the largest K it can choose; on CPU first 16, then 32 only if K auto picks a head past them).
    """
    from .discover import discover

    from .recipes import get_recipe

    t_total = time.perf_counter()
    from .preflight import check_discovery_settings, check_k, check_out_folder
    from .proxy import parse_settings

    rec = get_recipe(recipe)
    recipe_name = recipe or (DEFAULT_RECIPE if settings is None else "custom")
    k = parse_k(str(k if k is not None else rec.k))
    out = Path(out) if out is not None else default_out(model)
    check_out_folder(out, force)
    check_format(format, model)
    if format == "gguf" and save_dtype not in ("auto", "fp32"):
        raise PearError("--format gguf compares the written file with the folded model in fp32; "
                        "leave --save-dtype auto")
    if isinstance(discovery_settings, str) or discovery_settings is None:
        discovery_settings = parse_settings(discovery_settings)
    check_discovery_settings(discovery_settings)
    if top_m is not None and top_m < 1:
        raise PearError(f"--top-m must be >= 1, got {top_m}")
    check_k(model, k, top_m=top_m)
    given = {name: v for name, v in (("bounds", bounds), ("seed", seed)) if v is not None}
    fs = dataclasses.replace(settings or FitSettings(**rec.fit), **fit_overrides, **given)
    seed = fs.seed
    fs.make_objective(data_dir).check_data()
    cdtype = parse_dtype(compute_dtype(dtype, device))
    stages = _Stages(["load"] + ([] if fs.all_heads else ["discover"]) + ["fit", "fold + verify", "save"], progress)

    with stages("load", f"{model or 'smollm2-135m'} ({str(cdtype).replace('torch.', '')})"):
        loaded = load_model(model, dtype=cdtype, device=device, device_map=device_map)
        spec = loaded.spec.spec

    estimate = None
    if progress and fs.objective == "copy" and not fs.all_heads:  # what the long part will cost, from one measured step
        from .estimate import estimate_run

        on_cpu = next(loaded.model.parameters()).device.type == "cpu"
        m_guess = top_m or (CPU_TOP_M if on_cpu and k == "auto" and method == "fast" else
                            K_AUTO_RANGE[1] if k == "auto" else max(4 * k, 32))
        estimate = estimate_run(loaded.model, loaded.tokenizer, fs, discovery_settings, method=method,
                                top_m=m_guess, seed=seed)
        print(estimate.line(), file=sys.stderr)

    disc = None
    if fs.all_heads:
        heads, scores, evidence = all_heads(loaded.model), {}, {"method": f"every head ({fs.scales})"}
    else:
        with stages("discover", f"({method})"):
            m, staged = top_m, False
            if m is None and k == "auto":
                # every head --k auto can pick gets an exact score. On GPUs: the top 32 at once. On CPU,
                # where each exact re-check costs ~0.7 s per head and setting: the top 16 first, and the
                # top 32 only if K auto then reaches past them (SmolLM2 picks 11-12).
                on_cpu = next(loaded.model.parameters()).device.type == "cpu"
                m, staged = (CPU_TOP_M, True) if on_cpu and method == "fast" else (K_AUTO_RANGE[1], False)
            run_discovery = functools.partial(discover, loaded.model, loaded.tokenizer, settings=discovery_settings,
                                              method=method, seed=seed, k=k if isinstance(k, int) else 10,
                                              progress=progress, model_spec=spec)
            disc = run_discovery(top_m=m, checkpoint=Path(f"{out}.discover-{m or 'all'}.ckpt"))
            heads, scores, evidence = select_heads(disc, k)
            if staged and not all(bool(disc.exact[h]) for h in heads):
                disc = run_discovery(top_m=K_AUTO_RANGE[1], checkpoint=Path(f"{out}.discover-{K_AUTO_RANGE[1]}.ckpt"))
                heads, scores, evidence = select_heads(disc, k)
            if staged:
                disc.extra["staged_top_m"] = {"first": CPU_TOP_M, "extended_to": int(disc.extra.get("top_m", m))}
            disc.k = len(heads)  # heads.json's top_k and the heatmap outline: the heads we fit

    ckpt = Path(str(out) + ".fit.ckpt")
    with stages("fit", f"({len(heads)} heads, {fs.steps} steps x {fs.batch} sequences, bounds {fs.bounds})"):
        fr = fit(loaded.model, loaded.tokenizer, heads, fs, checkpoint=ckpt, restart=restart, progress=progress,
                 model_spec=spec, scores=scores, k_selection=evidence, data_dir=data_dir)
    from .distributed import is_main  # data-parallel (torchrun / accelerate launch):
    if not is_main():  # rank 0 alone folds, verifies and saves
        return None

    with stages("fold + verify"):
        sdtype = _native_dtype(model) if save_dtype == "auto" else parse_dtype(save_dtype)
        bar = stages.bar(4, "fold + verify")
        if sdtype != next(loaded.model.parameters()).dtype:
            del loaded
            gc.collect()
            loaded = load_model(model, dtype=sdtype, device=device, device_map=device_map)
        bar.update(1)
        heldout = heldout_batch(loaded.model, loaded.tokenizer, fs)
        saved_base = proxy_metrics(loaded.model, heldout, fs.micro_batch)
        bar.update(1)
        restore = snapshot_out_projs(loaded.model) if format == "peft" else None  # the adapter needs the base
        verification = verify_fold(loaded.model, fr.coefficients)  # folds in place, or raises
        bar.update(1)
        saved_folded = proxy_metrics(loaded.model, heldout, fs.micro_batch)
        if restore:
            restore()
        bar.update(1)
        bar.close()

    rows = [{"rank": i + 1, "layer": l, "head": h, "score": scores.get((l, h)),
             "coefficient": summary_value(fr.coefficients[(l, h)])} for i, (l, h) in enumerate(heads)]
    result = RunResult(
        out=out, model_dir=out / "model", heads_path=out / "heads.json", coefficients_path=out / "coefficients.json",
        report_path=out / "report.md",
        figures={"heatmap": out / "heads.png", "coefficients": out / "coefficients.png", "fit_loss": out / "fit_loss.png"},
        model=spec, method=method, k=len(heads), k_selection=evidence, heads=rows, coefficients=fr.coefficients,
        before=fr.before, after=fr.after,
        saved={"dtype": str(sdtype).replace("torch.", ""), "base": saved_base, "folded": saved_folded},
        verification=verification.as_dict(), losses=fr.losses, seconds={}, versions=versions(),
        settings={"fit": fs.as_dict(), "compute_dtype": fr.dtype, "save_dtype": str(sdtype).replace("torch.", ""),
                  "seed": seed, "k": k, "method": method, "recipe": recipe_name, "format": format,
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
            save(loaded, fr.coefficients, tmp / "model", verification=verification, extra={
                "pear_run": {"recipe": recipe_name, "objective": fs.objective,
                             "scales": fs.scales, "granularity": granularity(fr.coefficients),
                             "method": None if disc is None else method, "k": len(heads),
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
                       ("scales", "--scales"), ("penalty", "--penalty")]:
        if getattr(fs, name) != getattr(d, name):
            parts.append(f"{flag} {getattr(fs, name)}")
    parts += [f"--objective-option {k}={v}" for k, v in fs.objective_options.items()]
    if dtype != "auto":
        parts.append(f"--dtype {dtype}")
    if save_dtype != "auto":
        parts.append(f"--save-dtype {save_dtype}")
    return " ".join(parts)


# ---------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("run", help="the whole method: discover -> fit -> fold -> verify -> save (default model "
                       "if --model is omitted)",
                       description="Find the heads that suppress copying, learn a coefficient for each, fold "
                       "them into the weights and save an ordinary checkpoint with heads.json, "
                       "coefficients.json, report.md and figures.")
    add_model_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/<model>-pear)")
    p.add_argument("--method", default="fast", choices=["fast", "exact"],
                   help="discovery: fast (attribution patching + exact re-check of the top heads; default) or exact")
    p.add_argument("--discovery-settings", default=None, metavar="NxLEN,...",
                   help="proxy settings for discovery (default 20x50,40x25,80x15,100x10)")
    p.add_argument("--top-m", type=int, default=None,
                   help="fast discovery: heads re-scored exactly (default max(4k, 32); 32 for --k auto)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the saved model (default: the checkpoint's own; fp32 for GGUF)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    add_format_arg(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_fit_args(p)
    p.set_defaults(func=_cli_run)


def _cli_run(args: argparse.Namespace) -> int:
    from .hardware import announce
    from .preflight import check_discovery_settings, check_k, check_out_folder
    from .proxy import parse_settings

    out = Path(args.out) if args.out else default_out(args.model)
    check_out_folder(out, args.force)
    settings = settings_from_args(args)
    check_discovery_settings(parse_settings(args.discovery_settings))
    check_k(args.model, k_from_args(args), top_m=args.top_m)  # run() checks again: cheap, the shape is cached
    dtype = announce(args.device, args.dtype).dtype  # and the thread count
    res = run(args.model, out, k=k_from_args(args), method=args.method, settings=settings,
              recipe=args.recipe or DEFAULT_RECIPE, discovery_settings=args.discovery_settings, top_m=args.top_m, dtype=dtype,
              save_dtype=args.save_dtype, device=args.device, device_map=args.device_map, force=args.force,
              restart=args.restart, progress=not args.no_progress, data_dir=args.data_dir, format=args.format)
    if res is None:  # data-parallel: rank 0 reports
        return 0
    print(res.summary())
    print(f"report: {res.report_path}")
    return 0
