"""`pear bench overhead`: speed and memory of PEAR against the inference-time baselines."""

from __future__ import annotations

import argparse
import sys

from ..errors import PearError


def add_cli(sub) -> None:
    from ..bench import inference
    from ..bench import VARIANTS
    from . import add_model_args

    p = sub.add_parser("bench", help="benchmarks (overhead of PEAR vs inference-time baselines)",
                       description="Benchmarks. `pear bench overhead`: speed and memory of base, PEAR-folded, "
                       "Ms-PoE and Attention Buckets, interleaved in one run.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True
    o = bsub.add_parser("overhead", help="prefill/decode tokens/s and peak memory, as ratios to the base model",
                        description=inference.__doc__.split("\n\n")[1])
    add_model_args(o)
    o.add_argument("--pear", required=True, metavar="DIR", help="PEAR-folded checkpoint folder")
    o.add_argument("--context", type=int, default=2048, help="prompt tokens to prefill (default 2048)")
    o.add_argument("--new-tokens", type=int, default=64, help="greedy decoding steps (default 64)")
    o.add_argument("--trials", type=int, default=5, help="timed rounds over all variants (default 5)")
    o.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    o.add_argument("--batch", type=int, default=1, help="rows per forward (default 1)")
    o.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list (default {','.join(VARIANTS)}; also moice-one-by-one: MoICE's experts "
                   "one after another, at the base model's memory)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--moice-routers", default="init", metavar="DIR",
                   help="MoICE routers (pear baseline train moice); default: untrained, same cost")
    o.add_argument("--out", required=True, metavar="FILE.json")
    o.add_argument("--force", action="store_true", help="overwrite an existing --out")
    o.set_defaults(func=_cli_overhead)


def _cli_overhead(args: argparse.Namespace) -> int:
    from . import one_device

    one_device(args, "pear bench overhead")
    from ..bench import format_table, overhead, write_json_atomic
    from ..hardware import announce
    from ..loading import resolve_spec
    from ..preflight import check_out_file

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    check_out_file(args.out, args.force, example="bench.json")
    if min(args.context, args.new_tokens, args.trials, args.batch) < 1 or args.warmup < 0:
        raise PearError("--context, --new-tokens, --trials and --batch must be >= 1 (--warmup >= 0)")
    resolve_spec(args.model)
    resolve_spec(args.pear)
    dtype = announce(args.device, args.dtype).dtype

    def progress(r, v, t):
        tag = "warmup" if r < args.warmup else f"trial {r - args.warmup + 1}/{args.trials}"
        print(f"  {tag:<12} {v:<18} prefill {t.prefill_s:7.3f} s  decode {t.decode_s:7.3f} s", file=sys.stderr)

    res = overhead(args.model, args.pear, context=args.context, new_tokens=args.new_tokens, trials=args.trials,
                   warmup=args.warmup, batch=args.batch, variants=variants, dtype=dtype, device=args.device,
                   seed=args.seed, variant_options={"moice": {"routers": args.moice_routers}}, progress=progress)
    res["cli_args"] = {k: v for k, v in vars(args).items() if k != "func"}
    print(format_table(res))
    print(f"memory: {res['memory_method']}; saved {write_json_atomic(args.out, res)}")
    return 0
