"""`pear fold`: fold a coefficients.json into a model and save it (HF folder, GGUF file or PEFT adapter)."""

from __future__ import annotations

import argparse


def add_cli(sub) -> None:
    from . import add_model_args

    p = sub.add_parser("fold", help="fold head coefficients into the weights and save a checkpoint",
                       description="Scale attention heads by the given coefficients, fold the scales "
                       "into the output projection (scales on the queries: the query projection), verify, "
                       "and save an ordinary HF folder.")
    add_model_args(p, auto="checkpoint")
    p.add_argument("--coefficients", required=True, metavar="FILE.json",
                   help='{"heads": [{"layer": L, "head": H, "coefficient": a}, ...]}')
    p.add_argument("--layers", default="", metavar="A-B[+C-D]",
                   help="fold only the coefficients of these layers (e.g. 0-4+15-19); the other heads stay as they are")
    p.add_argument("--strength", type=float, default=1.0, metavar="C",
                   help="scale every coefficient's distance from 1 by C: a -> 1 + C (a - 1) (1: as fitted; 0: the base)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    add_format_arg(p)
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |folded - hooked| logit difference (default: relative to the logit scale, by dtype)")
    p.set_defaults(func=_cli_fold)


def add_format_arg(p) -> None:
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "peft"],
                   help="hf: a Hugging Face folder (default); gguf: the base GGUF file with re-weighted attention "
                   "output tensors (needs a GGUF base); peft: an IA3 adapter for PeftModel.from_pretrained")


def _cli_fold(args: argparse.Namespace) -> int:
    from ..folding import fold_and_save, read_coefficients
    from ..folding.coefficients import read_site, select
    from ..preflight import check_heads, check_out_folder

    coefs = read_coefficients(args.coefficients)
    site = read_site(args.coefficients)  # where the scales act: the heads' outputs, or their queries
    coefs = select(coefs, args.layers, args.strength)
    check_out_folder(args.out, args.force)
    check_heads(args.model, coefs)
    if args.format != "hf":
        from ..export.formats import fold_to_format

        return fold_to_format(args, coefs, site)
    out, v = fold_and_save(args.model, coefs, args.out, force=args.force, tolerance=args.tolerance, site=site,
                           dtype=args.dtype, device=args.device, device_map=args.device_map)
    print(f"folded {len(coefs)} heads{' (their queries)' if site == 'query' else ''}; max |folded - hooked| "
          f"logit diff {v.max_abs_diff:.3g} (tolerance {v.tolerance:.3g}); saved {out}")
    return 0
