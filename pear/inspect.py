"""`pear inspect`: what pear sees in a model (family, heads, head_dim, position embedding)."""

from __future__ import annotations

import argparse
import json

from .families import resolve
from .loading import count_parameters, load_model, resolve_spec


def describe(loaded) -> dict:
    model = loaded.model
    arch = resolve(model)
    return {
        "model": loaded.spec.spec,
        "source": loaded.spec.kind,
        "family": arch.model_type,
        "layers": arch.n_layers,
        "heads": arch.n_heads,
        "kv_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        "position_embedding": arch.position,
        "output_projection": arch.out_proj_path(0).replace(".0.", ".{layer}."),
        "weight_layout": "[in, out] (Conv1D)" if arch.family.weight_in_rows else "[out, in] (Linear)",
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def add_cli(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("inspect", help="show family, layers, heads, KV heads, head_dim, position embedding")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cli_inspect)


def _cli_inspect(args: argparse.Namespace) -> int:
    resolve_spec(args.model)  # a bad spec fails before torch and transformers load anything
    info = describe(load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0
