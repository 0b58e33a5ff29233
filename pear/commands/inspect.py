"""`pear inspect`: what pear sees in a model (family, heads, head_dim, position embedding)."""

from __future__ import annotations

import argparse
import json


def add_cli(sub) -> None:
    from . import add_model_args

    p = sub.add_parser("inspect", help="show family, layers, heads, KV heads, head_dim, position embedding")
    add_model_args(p, auto="checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cli_inspect)


def _cli_inspect(args: argparse.Namespace) -> int:
    from ..inspect import describe
    from ..loading import load_model, resolve_spec

    resolve_spec(args.model)  # a bad spec fails before torch and transformers load anything
    info = describe(load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0
