"""The `pear` command. Each pipeline module registers its own subcommand via `add_cli`.

Errors the user can fix (`PearError`, missing files, bad options) print one line and exit
with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import PearError

# Modules that define `add_cli(subparsers)`; order is the order shown in --help.
COMMAND_MODULES = [
    "pear.checkpoint",  # pear fold
    "pear.inspect",  # pear inspect
    "pear.discover",  # pear discover
    "pear.fit",  # pear fit
    "pear.pipeline",  # pear run
    "pear.evaluate.cli",  # pear eval
    "pear.bench",  # pear bench overhead
    "pear.baselines.moice_train",  # pear baseline train moice
]


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """--model/--dtype/--device/--device-map, shared by every command that loads a model."""
    if multiple:
        p.add_argument("--model", action="append", metavar="SPEC",
                       help="model spec (repeatable): folder, hub id, .gguf file or preset")
    else:
        p.add_argument("--model", default=None, metavar="SPEC",
                       help="folder, hub id, .gguf file or preset (default: smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (multi-GPU)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pear", description="PEAR: re-weight attention heads so LLMs read their context better, "
        "folded into an ordinary checkpoint.")
    parser.add_argument("--version", action="version", version=f"pear {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="pear: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        rc = args.func(args)
    except PearError as e:
        print(f"pear: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"pear: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pear: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
