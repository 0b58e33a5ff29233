"""`pear fit`: learn the coefficients of the selected heads; the fit options `pear run` shares."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import PearError

if TYPE_CHECKING:
    from ..fit import FitSettings


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """Fit options shared by `pear fit` and `pear run`. Options left out take the recipe's
    value (`pear.recipes`), then FitSettings' default."""
    from ..fit import BOUNDS, SCALES, FitSettings
    from . import add_k_arg
    from ..recipes import DEFAULT_RECIPE, NAME_KEYS, RECIPES

    d = FitSettings()
    p.add_argument("--recipe", default=None, type=recipe_name, metavar="NAME",
                   help=f"named fit settings (default: the preset's confirmed recipe, else {DEFAULT_RECIPE}; without CUDA "
                   f"{DEFAULT_RECIPE} where that recipe's fit needs a GPU): "
                   + "; ".join(f"{k}: {r.description}" for k, r in RECIPES.items())
                   + f"; NAME@KEY=VALUE,... changes the recipe's {', '.join(NAME_KEYS)} "
                   "(e.g. retrieval-channels@anchor=50,anchor_source=questions)")
    add_k_arg(p, "the recipe's (auto)")
    p.add_argument("--bounds", default=None, choices=list(BOUNDS),
                   help="coefficient range: " + ", ".join(f"{b.name} {b.help}" for b in BOUNDS.values()))
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=None, help=f"proxy sequences per step (default {d.batch})")
    p.add_argument("--length", type=int, default=None, help=f"tokens per copy, n (default {d.length})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 10%% of steps)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help=f"held-out proxy sequences for before/after metrics (default {d.eval_batch})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward pass, gradients accumulated (default: whole batch on GPU, "
                   "~1000 tokens on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations (large models)")
    p.add_argument("--objective", default=None, choices=list(_objective_names()),
                   help="what the scales learn: copy (the paper's proxy), long-copy, retrieval, "
                   "position-distill (see pear.objectives)")
    p.add_argument("--objective-option", dest="objective_options", action="append", default=None,
                   metavar="KEY=VALUE", help="an option of the objective, e.g. documents=20 (repeatable)")
    p.add_argument("--scales", default=None, choices=list(SCALES),
                   help="parameterisation: " + "; ".join(f"{k}: {v}" for k, v in SCALES.items()))
    p.add_argument("--layers", default=None, metavar="A-B[+C-D]",
                   help="with --scales all-heads or channels: scale the heads of these layers only, e.g. 0-4+15-19")
    p.add_argument("--fold-layers", default=None, metavar="A-B[+C-D]",
                   help="keep the fitted scales of these layers only (the others at 1), e.g. 15-19: the fit is "
                   "the same, what is folded changes")
    p.add_argument("--strength", type=float, default=None, metavar="C",
                   help="fold each kept scale's distance from 1 times C: a -> 1 + C (a - 1) (default 1)")
    p.add_argument("--penalty", type=float, default=None,
                   help="weight of mean((alpha - 1)^2) in the loss (default 0)")
    p.add_argument("--anchor", type=float, default=None,
                   help="weight of the knowledge anchor: KL(base || scaled) on plain Wikipedia paragraphs of "
                   "SQuAD 2.0, which keeps what the model knows (default 0; see pear.objectives.anchor)")
    p.add_argument("--anchor-source", default=None, choices=list(_anchor_sources()),
                   help="what the anchor reads: paragraphs (default), or SQuAD 2.0 questions without their "
                   "passage (KL at the answer's first token)")
    p.add_argument("--data-dir", default=None,
                   help="data folder for objectives that read one (SQuAD 2.0; default $PEAR_DATA)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--restart", action="store_true", help="discard a checkpoint from an earlier, different fit")


def _anchor_sources():
    from ..objectives.anchor import SOURCES

    return SOURCES


def _objective_names():
    from ..objectives import OBJECTIVES

    return OBJECTIVES


FIT_ARGS = ("steps", "batch", "length", "lr", "warmup", "bounds", "seed", "eval_batch", "micro_batch",
            "grad_checkpointing", "objective", "scales", "layers", "penalty", "anchor", "anchor_source", "fold_layers",
            "strength")


def recipe_name(text: str) -> str:
    """--recipe's value: a recipe of `pear.recipes`, or RECIPE@KEY=VALUE,... (checked here, so that a
    bad name is one usage line before anything loads)."""
    from ..errors import PearError
    from ..recipes import get_recipe

    try:
        get_recipe(text)
    except PearError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def recipe_from_args(args: argparse.Namespace) -> str:
    """--recipe, or the model's default (`pear.recipes.default_recipe`)."""
    from ..recipes import default_recipe

    return args.recipe or default_recipe(args.model, getattr(args, "device", "auto"))


def recipe_note_from_args(args: argparse.Namespace) -> str | None:
    """Why the default recipe is not the preset's own on this device (`pear.recipes.default_note`);
    None when --recipe is given."""
    from ..recipes import default_note

    return default_note(args.model, args.device) if args.recipe is None else None


def settings_from_args(args: argparse.Namespace) -> FitSettings:
    """The recipe's settings, with every option given on the command line on top."""
    from ..fit import FitSettings
    from ..objectives import parse_options
    from ..recipes import get_recipe

    values = dict(get_recipe(recipe_from_args(args)).fit)
    if args.objective is not None and args.objective != values.get("objective"):
        values.pop("objective_options", None)  # the recipe's options belong to its own objective
    values.update({k: getattr(args, k) for k in FIT_ARGS if getattr(args, k, None) is not None})
    if args.objective_options is not None:
        values["objective_options"] = parse_options(args.objective_options)
    return FitSettings(**values)


def k_from_args(args: argparse.Namespace) -> int | str:
    from ..heads import parse_k
    from ..recipes import get_recipe

    return parse_k(args.k if args.k is not None else get_recipe(recipe_from_args(args)).k)


def add_cli(sub) -> None:
    from . import add_model_args

    p = sub.add_parser("fit", help="learn one coefficient per selected head on the proxy task",
                       description="Learn a scale for each of the top-K discovered heads with every model "
                       "weight frozen; write coefficients.json (for `pear fold`). Interrupted fits resume "
                       "when the same command is run again.")
    add_model_args(p)
    p.add_argument("--heads", default=None, metavar="heads.json",
                   help="output of `pear discover` (needed with --scales heads, the default)")
    p.add_argument("--out", required=True, metavar="coefficients.json")
    add_fit_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop after this many steps (checkpoint kept; run again to continue)")
    p.set_defaults(func=_cli_fit)


def _cli_fit(args: argparse.Namespace) -> int:
    from ..fit import fit, metrics_text
    from ..training import checkpoint_path_for
    from ..heads import all_heads, select_heads
    from ..hardware import announce
    from ..loading import load_model
    from ..preflight import check_heads, check_out_file

    check_out_file(args.out, args.force, example="coefficients.json")
    settings = settings_from_args(args)
    if args.max_steps_this_run is not None and args.max_steps_this_run < 1:
        raise PearError(f"--max-steps-this-run must be >= 1, got {args.max_steps_this_run}")
    from ..recipes import check_recipe_data

    check_recipe_data(settings, args.data_dir, args.model, recipe_from_args(args), by_default=args.recipe is None)
    note = recipe_note_from_args(args)
    if note:
        print(f"pear: {note}", file=sys.stderr)
    k = k_from_args(args)
    if settings.all_heads:
        heads, scores, evidence = None, {}, {"method": f"every head ({settings.scales})"}
    elif args.heads is None:
        raise PearError("--heads heads.json is needed with --scales heads (or use --scales all-heads/channels)")
    else:
        heads, scores, evidence = select_heads(args.heads, k)
        check_heads(args.model, heads)
    choice = announce(args.device, args.dtype)
    loaded = load_model(args.model, dtype=choice.dtype, device=args.device, device_map=args.device_map)
    heads = heads or all_heads(loaded.model, settings.layers)
    ckpt = checkpoint_path_for(args.out)
    res = fit(loaded.model, loaded.tokenizer, heads, settings, checkpoint=ckpt, restart=args.restart,
              max_steps_this_run=args.max_steps_this_run, model_spec=loaded.spec.spec, scores=scores,
              k_selection=evidence, data_dir=args.data_dir)
    from .. import distributed

    if not distributed.is_main():  # data-parallel: rank 0 saves
        return 0
    if not res.finished:
        print(f"pear: stopped after step {res.step}/{settings.steps} as asked; checkpoint {ckpt}; "
              "run the same command again to continue", file=sys.stderr)
        return 0
    res.save(args.out)
    ckpt.unlink(missing_ok=True)
    values = [v for c in res.coefficients.values() for v in (c if isinstance(c, list) else [c])]
    print(f"fitted {len(heads)} heads in {res.seconds:.1f} s: {metrics_text(res.before, res.after)}; "
          f"coefficients in [{min(values):.3f}, {max(values):.3f}]; "
          f"saved {args.out}")
    return 0
