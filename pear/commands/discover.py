"""`pear discover`: score every attention head by Δπ and write heads.json with its heatmap."""

from __future__ import annotations

import argparse

from ..errors import PearError


def add_cli(sub) -> None:
    from ..discover import METHODS
    from . import add_k_arg, add_model_args

    p = sub.add_parser("discover", help="score every attention head by Δπ on the proxy copying task "
                       "(writes heads.json and a heatmap PNG)")
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write heads.json")
    p.add_argument("--method", default="fast", choices=METHODS,
                   help="fast: attribution patching + exact re-check of the top M (default); exact: every head")
    p.add_argument("--settings", default=None, metavar="NxLEN,...",
                   help="proxy settings, N samples x length (default 20x50,40x25,80x15,100x10)")
    p.add_argument("--seed", type=int, default=0)
    add_k_arg(p, "10 (outlined in the heatmap and recorded as top_k)")
    p.add_argument("--top-m", type=int, default=None, help="fast: heads re-checked exactly (default max(4k, 32); "
                   "32 for --k auto)")
    p.add_argument("--batch-heads", type=int, default=None, help="ablations per batched re-run (default: auto)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cli_discover)


def _cli_discover(args: argparse.Namespace) -> int:
    from ..discover import discover
    from ..hardware import announce
    from ..heads import parse_k
    from ..loading import load_model
    from ..preflight import check_discovery_settings, check_k, check_out_file
    from ..proxy import parse_settings

    out = check_out_file(args.out, args.force, also=(".png",), example="heads.json")
    settings = check_discovery_settings(parse_settings(args.settings))
    k = parse_k(args.k or "10")
    for name in ("top_m", "batch_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PearError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_k(args.model, k if args.k else None, top_m=args.top_m)  # an explicit --k only: 10 is capped
    choice = announce(args.device, args.dtype)
    loaded = load_model(args.model, dtype=choice.dtype, device=args.device, device_map=args.device_map)
    res = discover(loaded.model, loaded.tokenizer, settings=settings, method=args.method, seed=args.seed,
                   top_m=args.top_m, k=k, batch_heads=args.batch_heads, progress=not args.no_progress,
                   model_spec=loaded.spec.spec, checkpoint=out.with_name(out.name + ".ckpt"))
    from .. import distributed

    if not distributed.is_main():  # data-parallel: every rank has the result, rank 0 writes it
        return 0
    res.save(out)
    print(f"{res.method} discovery: {res.n_layers} layers x {res.n_heads} heads, {len(res.settings)} settings, "
          f"{res.seconds:.1f} s, {res.forward_equivalents:.1f} forward-equivalents")
    print(f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'Δπ':>8}  exact")
    for i, (l, h) in enumerate(res.top(), 1):
        print(f"{i:>4}  {l:>5}  {h:>4}  {100 * float(res.scores[l, h]):>+7.2f}%  {'yes' if res.exact[l, h] else 'no'}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
