"""`pear baseline train moice`: train MoICE's routers (the baselines that need training)."""

from __future__ import annotations

import argparse

from ..baselines.moice_train import DEFAULTS
from ..errors import PearError


def add_cli(sub) -> None:
    from ..baselines import moice_train
    from . import add_model_args

    p = sub.add_parser("baseline", help="train the baselines that need training (MoICE's routers)",
                       description="Baselines that need a training step. `pear baseline train moice`: "
                       "MoICE's routers, model frozen; evaluate with `pear eval --variant moice "
                       "--variant-option routers=DIR`.")
    bsub = p.add_subparsers(dest="baseline_command", metavar="ACTION")
    bsub.required = True
    t = bsub.add_parser("train", help="train a baseline's parameters")
    tsub = t.add_subparsers(dest="baseline_name", metavar="BASELINE")
    tsub.required = True
    m = tsub.add_parser("moice", help="MoICE routers on SQuAD 2.0 long instructions (model frozen)",
                        description=moice_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(m)
    m.add_argument("--out", required=True, metavar="DIR", help="folder for routers.safetensors and moice.json; until "
                   "it is written, DIR.resume.pt keeps each step, and the same command continues from it")
    m.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps (default 7)")
    m.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="sequences per step (default 128)")
    m.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per sequence, at most (4096)")
    m.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="constant learning rate (default 1e-4)")
    m.add_argument("--aux-coef", type=float, default=DEFAULTS["aux_coef"], help="load-balancing weight (0.3)")
    m.add_argument("--bases", default=None, help="comma list of RoPE bases for a base-10000 model, scaled to the "
                   "model's own base (default 10000,17500,18000,19000,20000,22500,25000)")
    m.add_argument("--top-k", type=int, default=None, help="experts kept per token and head (default: all)")
    m.add_argument("--micro-batch", type=int, default=1, metavar="N",
                   help="sequences per forward pass (default 1; the same gradient up to rounding, faster on a GPU "
                   "with memory to spare)")
    m.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    m.add_argument("--data-dir", default=None, help="data folder (default $PEAR_DATA)")
    m.add_argument("--force", action="store_true", help="replace a non-empty --out")
    m.set_defaults(func=_cli_train_moice)


def _cli_train_moice(args: argparse.Namespace) -> int:
    import sys

    from . import one_device

    one_device(args, "pear baseline train moice")
    try:
        bases = None if args.bases is None else [float(b) for b in args.bases.split(",") if b.strip()]
    except ValueError:
        raise PearError(f"--bases must be a comma list of numbers, got '{args.bases}'") from None

    def progress(h):
        print(f"  step {h['step']}/{args.steps}  loss {h['loss']:.4f}  ce {h['ce']:.4f}  aux {h['aux']:.4f}  "
              f"|g| {h['grad_norm']:.3g}  {h['seconds']:.1f} s", file=sys.stderr)

    from ..baselines.moice_train import train_moice

    s = train_moice(args.model, args.out, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                    aux_coef=args.aux_coef, bases=bases, top_k=args.top_k, seed=args.seed, data_dir=args.data_dir,
                    dtype=args.dtype, device=args.device, micro_batch=args.micro_batch, force=args.force,
                    progress=progress, log=lambda m: print(m, file=sys.stderr))
    h = s["history"]
    print(f"moice routers: {s['n_layers']} layers x {len(s['bases'])} experts (top-{s['top_k']}); loss "
          f"{h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}; saved {args.out}")
    return 0
