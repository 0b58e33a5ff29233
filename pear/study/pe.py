"""The position-embedding study in one command: train three models -> `pear run` -> evaluate -> report.

    python3 benchmarks/pe_study.py --out DIR [--recipe NAME --run-option KEY=VALUE ...]

Stages (``--stages``, default all): ``train`` writes ``DIR/<arch>/base/`` (an ordinary HF
folder with the tokenizer and train.json); ``pear`` runs `pear.run` on it with the recipe's
options into ``DIR/<arch>/pear-<recipe>/`` (+ ``pear-<recipe>.run.json``); ``eval`` scores base
and PEAR on the same examples (`pear.evaluate`: paired bootstrap and McNemar per gold
position) into ``DIR/eval-<recipe>-<arch>.json`` (+ .md, .png); ``report`` writes
``DIR/study-<recipe>.{json,md,png}``, ``DIR/heads-<recipe>.png`` and ``DIR/train_loss.png`` and
prints the table. A stage whose output exists is reused when its settings match (so a second
recipe reruns only ``pear`` and ``eval``) and refused when they differ. Weights stay in DIR:
nothing here is meant for the repository but the JSON, Markdown and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path

from ..atomic import write_text
from ..errors import PearError
from .archs import ARCHS, parse_archs, parse_size
from .train import TrainSettings, read_train_record, study_tokenizer, train

STAGES = ("train", "pear", "eval", "report")
DEFAULT_TASKS = "kv-8,passkey-400,copy-400"
DEFAULT_POSITIONS = "0%,25%,50%,75%,100%"
LABELS = ("base", "pear")


def parse_run_options(items: list[str] | None) -> dict:
    """["k=auto", "bounds=unit", "steps=60"] -> {"k": "auto", "bounds": "unit", "steps": 60}, checked
    against `pear.run`'s keywords and `FitSettings` before any work."""
    from ..fit import FitSettings
    from ..pipeline import run

    allowed = set(inspect.signature(run).parameters) - {"model", "out", "settings", "force", "restart", "progress",
                                                         "command", "fit_overrides", "device", "device_map"}
    allowed |= {f.name for f in dataclasses.fields(FitSettings)}
    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in allowed:
            raise PearError(f"--run-option {item!r}: use KEY=VALUE with KEY among {', '.join(sorted(allowed))}")
        out[key] = _value(raw.strip())
    _check_run_options(out)
    return out


def _check_run_options(opts: dict) -> None:
    """The values pear.run would refuse, refused now (before hours of training)."""
    from ..fit import FitSettings
    from ..heads import parse_k
    from ..loading import parse_dtype
    from ..proxy import parse_settings

    from ..recipes import recipe_settings

    recipe_settings(opts.get("recipe"), **{k: v for k, v in opts.items()
                                           if k in {f.name for f in dataclasses.fields(FitSettings)}})
    if "k" in opts:
        parse_k(str(opts["k"]))
    if opts.get("method", "fast") not in ("fast", "exact"):
        raise PearError(f"--run-option method={opts['method']}: use fast or exact")
    for name in ("dtype", "save_dtype"):
        if name in opts:
            parse_dtype(str(opts[name]))
    if "discovery_settings" in opts:
        parse_settings(str(opts["discovery_settings"]))


def _value(raw: str):
    if raw.startswith(("{", "[")):  # e.g. objective_options={"source": "squad", "documents": 5}
        try:
            return json.loads(raw)
        except ValueError:
            raise PearError(f"--run-option value {raw!r} is not valid JSON") from None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def _same_or_refuse(path: Path, wanted: dict, what: str) -> bool:
    """True if `path` (JSON) records `wanted`; False if absent; PearError if it differs."""
    if not path.is_file():
        return False
    have = json.loads(path.read_text())
    if have.get("key") != json.loads(json.dumps(wanted)):
        raise PearError(f"{path.parent} holds a {what} made with other settings ({have.get('key')} != {wanted}); "
                        "use another --out or --recipe, or remove it")
    return True


def study(out, *, archs=None, settings: TrainSettings | None = None, tasks: str = DEFAULT_TASKS,
          positions: str | None = DEFAULT_POSITIONS, limit: int | None = 100, recipe: str = "paper",
          run_options: dict | None = None, stages=STAGES, tokenizer: str | None = None, data_dir=None,
          device: str = "auto", workers: int | None = None, micro_batch: int | None = None, progress: bool = True,
          command: str = "") -> dict:
    """Run the study's stages; returns the summary (also written as study-<recipe>.json)."""
    from ..evaluate.data import resolve_data_dir
    from ..evaluate.registry import BuildContext, build_task, parse_positions

    out = Path(out)
    archs = parse_archs(",".join(archs) if isinstance(archs, (list, tuple)) else archs)
    s = settings or TrainSettings()
    opts = dict(run_options or {})
    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [x for x in stages if x not in STAGES]
    if bad or not stages:
        raise PearError(f"--stages: use some of {', '.join(STAGES)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", recipe):
        raise PearError(f"--recipe {recipe!r}: letters, digits, '-', '_' and '.' only")
    ddir = resolve_data_dir(data_dir)
    pos = parse_positions(positions)
    for t in task_names:  # unknown tasks or sizes fail here, before any training
        build_task(t, BuildContext(ddir, limit=1, positions=pos, seed=s.seed))
    if "train" not in stages and not out.is_dir():
        raise PearError(f"study folder {out} does not exist: run the train and pear stages first")
    out.mkdir(parents=True, exist_ok=True)
    tok, passages = None, None
    for arch in archs:
        base, pdir = out / arch / "base", out / arch / f"pear-{recipe}"
        if "train" in stages:
            rec = read_train_record(base)
            if rec is not None and rec["settings"] != json.loads(json.dumps(s.as_dict())):
                raise PearError(f"{base} was trained with other settings ({rec['settings']}); use another --out")
            if rec is None:
                if tok is None:
                    from .corpus import training_passages

                    tok, passages = study_tokenizer(tokenizer), training_passages(ddir)
                train(arch, base, tok, passages, s, device=device, workers=workers, micro_batch=micro_batch,
                      progress=progress, command=command)
        if "pear" in stages:
            _pear(base, pdir, opts, s.seed, device, progress)
        if "eval" in stages:
            _evaluate(out, arch, base, pdir, recipe, task_names, positions, limit, s.seed, ddir, device, progress,
                      command)
    if "report" in stages:
        return report(out, archs, recipe, task_names, command=command)
    return {}


def _pear(base: Path, pdir: Path, opts: dict, seed: int, device: str, progress: bool) -> None:
    import pear

    if not (base / "config.json").is_file():
        raise PearError(f"no trained model in {base}: run the train stage first")
    record = pdir.with_name(pdir.name + ".run.json")
    kw = {"seed": seed, **opts}
    key = {"run_options": kw, "base": read_train_record(base)["settings"]}
    if _same_or_refuse(record, key, "PEAR run") and (pdir / "model" / "config.json").is_file():
        return
    res = pear.run(str(base), pdir, device=device, progress=progress, force=pdir.exists(), **kw)
    write_text(record, json.dumps({"key": key, "k": res.k, "heads": res.heads,
                                   "coefficients": {f"{l}.{h}": a for (l, h), a in res.coefficients.items()},
                                   "before": res.before, "after": res.after, "saved": res.saved,
                                   "seconds": res.seconds, "command": res.command}, indent=1) + "\n")


def _evaluate(out, arch, base, pdir, recipe, tasks, positions, limit, seed, ddir, device, progress, command):
    from ..evaluate.runner import ModelEntry, evaluate, save_results

    path = out / f"eval-{recipe}-{arch}.json"
    run_file = pdir.with_name(pdir.name + ".run.json")
    if not run_file.is_file() or not (base / "config.json").is_file():
        raise PearError(f"no trained model or PEAR run for {arch} in {out}: run the train and pear stages first")
    key = {"tasks": tasks, "positions": positions, "limit": limit, "seed": seed,
           "pear_run": json.loads(run_file.read_text())["key"]}
    if path.is_file() and json.loads(path.read_text()).get("study_key") == json.loads(json.dumps(key)):
        return
    models = [ModelEntry(str(base), label="base"), ModelEntry(str(pdir / "model"), label="pear")]
    res = evaluate(models, tasks, data_dir=ddir, limit=limit, positions=positions, seed=seed, device=device,
                   chat="auto", progress=progress, command=command)
    res["study_key"] = key
    save_results(res, path)


def report(out, archs: list[str], recipe: str, tasks: list[str], command: str = "") -> dict:
    """Gather the stages' files into the summary, the table and the figures."""
    from ..discover import read_heads
    from .figures import markdown_table, plot_heads, plot_positions, plot_training

    out = Path(out)
    summary = {"recipe": recipe, "tasks": tasks, "archs": {}, "command": command}
    heads, records = {}, {}
    for arch in archs:
        rec = read_train_record(out / arch / "base")
        run_file = out / arch / f"pear-{recipe}.run.json"
        eval_file = out / f"eval-{recipe}-{arch}.json"
        if rec is None or not run_file.is_file() or not eval_file.is_file():
            raise PearError(f"report: {arch} lacks its trained model, PEAR run or evaluation in {out}")
        records[arch] = rec
        pr = json.loads(run_file.read_text())
        hfile = out / arch / f"pear-{recipe}" / "heads.json"
        if hfile.is_file():  # a recipe that scales every head runs no discovery: no heat map
            heads[arch] = (read_heads(hfile).scores, [(h["layer"], h["head"]) for h in pr["heads"]])
        ev = json.loads(eval_file.read_text())
        a = {"class": rec["class"], "model_type": rec["model_type"], "position": rec["position"],
             "train": {k: rec.get(k) for k in ("parameters", "final_loss", "heldout", "tokens", "seconds", "device",
                                                "induction")},
             "pear": {k: pr[k] for k in ("k", "heads", "coefficients", "before", "after", "command")}, "tasks": {}}
        for task in tasks:
            t = ev["tasks"].get(task)
            if t is None or not all(lab in t["models"] for lab in LABELS):
                raise PearError(f"report: {eval_file} has no complete results for {task}")
            cmp = t["paired"]["pear"]["conditions"]
            conds = [c for c in t["conditions"] if c != "all"]
            a["tasks"][task] = {
                "n": cmp["all"]["n"], "base": t["models"]["base"]["all"]["accuracy"],
                "pear": t["models"]["pear"]["all"]["accuracy"], "diff": cmp["all"]["diff"],
                "ci95": cmp["all"]["ci95"], "p_mcnemar": cmp["all"]["p_mcnemar"],
                "p_bootstrap": cmp["all"]["p_bootstrap"],
                "skipped": {lab: t["models"][lab]["all"]["skipped"] for lab in LABELS},
                "by_position": {c: {"base": t["models"]["base"][c], "pear": t["models"]["pear"][c],
                                    "diff": cmp[c]["diff"], "p_mcnemar": cmp[c]["p_mcnemar"]} for c in conds}}
        summary["archs"][arch] = a
    table = markdown_table(summary)
    write_text(out / f"study-{recipe}.json", json.dumps(summary, indent=1) + "\n")
    write_text(out / f"study-{recipe}.md", f"# Position-embedding study, recipe `{recipe}`\n\n{table}")
    plot_positions(summary, out / f"study-{recipe}.png")
    if heads:
        plot_heads(heads, out / f"heads-{recipe}.png")
    plot_training(records, out / "train_loss.png")
    print(table)
    return summary


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="pe_study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="study folder (checkpoints, runs, results)")
    p.add_argument("--archs", default=None, help=f"comma-separated among {', '.join(ARCHS)} (default rope,learned,alibi)")
    p.add_argument("--size", default=d.size, help="study (default, ~50M parameters), small or tiny")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"windows per step (default {d.batch})")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the size's context)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps (default {d.warmup})")
    p.add_argument("--mix", default=None, help="data mix, e.g. text=0.35,repeat=0.2,copy=0.15,kv=0.2,passkey=0.1 (the default)")
    p.add_argument("--max-passages", type=int, default=None, help="use only the first N training passages")
    p.add_argument("--heldout-windows", type=int, default=d.heldout_windows,
                   help=f"held-out windows for the loss curve (default {d.heldout_windows})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"evaluation tasks (default {DEFAULT_TASKS})")
    p.add_argument("--positions", default=DEFAULT_POSITIONS, help=f"gold positions (default {DEFAULT_POSITIONS.replace('%', '%%')})")
    p.add_argument("--limit", type=int, default=100, help="records per task (default 100; x positions examples)")
    p.add_argument("--recipe", default="paper", help="name of the PEAR recipe (default paper: pear run's defaults)")
    p.add_argument("--run-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of pear.run for this recipe, e.g. bounds=unit, k=8, steps=60 (repeatable)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated among {', '.join(STAGES)}")
    p.add_argument("--tokenizer", default=None, help="model spec or tokenizer folder whose tokenizer is used (default smollm2-135m)")
    p.add_argument("--data-dir", default=None, help="data folder (default $PEAR_DATA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 8 on GPU, 0 on CPU)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="windows per forward pass in training (default 8: ~10 GB of GPU memory at the default "
                   "size; the same gradient up to rounding)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .corpus import parse_mix

        parse_size(args.size)
        settings = TrainSettings(size=args.size, steps=args.steps, batch=args.batch, window=args.window, lr=args.lr,
                                 warmup=args.warmup, seed=args.seed, mix=parse_mix(args.mix) if args.mix else None,
                                 max_passages=args.max_passages, heldout_windows=args.heldout_windows)
        study(args.out, archs=args.archs, settings=settings, tasks=args.tasks, positions=args.positions,
              limit=args.limit, recipe=args.recipe, run_options=parse_run_options(args.run_option),
              stages=[x.strip() for x in args.stages.split(",") if x.strip()], tokenizer=args.tokenizer,
              data_dir=args.data_dir, device=args.device, workers=args.workers, micro_batch=args.micro_batch,
              progress=not args.no_progress,
              command=" ".join(["python3 benchmarks/pe_study.py", *(argv if argv is not None else sys.argv[1:])]))
    except PearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
