"""`pear run`: the whole method in one command (`pear.pipeline.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .fit import add_fit_args, k_from_args, recipe_from_args, recipe_note_from_args, settings_from_args
from .fold import add_format_arg


def add_cli(sub) -> None:
    from . import add_model_args

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
    from ..hardware import announce
    from ..pipeline import default_out, run
    from ..preflight import check_discovery_settings, check_k, check_out_folder
    from ..proxy import parse_settings
    from ..recipes import check_recipe_data

    out = Path(args.out) if args.out else default_out(args.model)
    check_out_folder(out, args.force)
    settings = settings_from_args(args)
    check_recipe_data(settings, args.data_dir, args.model, recipe_from_args(args), by_default=args.recipe is None)
    check_discovery_settings(parse_settings(args.discovery_settings))
    check_k(args.model, k_from_args(args), top_m=args.top_m)  # run() checks again: cheap, the shape is cached
    dtype = announce(args.device, args.dtype).dtype  # and the thread count
    res = run(args.model, out, k=k_from_args(args), method=args.method, settings=settings,
              recipe=recipe_from_args(args), discovery_settings=args.discovery_settings, top_m=args.top_m, dtype=dtype,
              save_dtype=args.save_dtype, device=args.device, device_map=args.device_map, force=args.force,
              restart=args.restart, progress=not args.no_progress, data_dir=args.data_dir, format=args.format,
              recipe_note=recipe_note_from_args(args))
    if res is None:  # data-parallel: rank 0 reports
        return 0
    print(res.summary())
    print(f"report: {res.report_path}")
    return 0
