"""The `pear` subcommands, one small module each: `add_cli(subparsers)` declares the options,
a `_cli_*` function turns them into one call of the library. The library never imports from
here; `pear.cli` imports only the chosen command's module, so ``pear --help`` stays fast.
"""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False, auto: str = "compute") -> None:
    """--model/--dtype/--device/--device-map, shared by every command that loads a model.

    auto: what ``--dtype auto`` means for this command (`pear.dtypes.AUTO_MEANING`): "compute"
    for commands that compute with the model, "checkpoint" for those that keep its weights.
    """
    from ..dtypes import AUTO_MEANING

    if multiple:
        p.add_argument("--model", action="append", metavar="SPEC",
                       help="model spec (repeatable): folder, hub id, .gguf file or preset")
    else:
        p.add_argument("--model", default=None, metavar="SPEC",
                       help="folder, hub id, .gguf file or preset (default: smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=f"auto: {AUTO_MEANING[auto]}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (multi-GPU)")


def add_k_arg(p: argparse.ArgumentParser, default: str) -> None:
    """--k, one meaning in every command: how many heads `pear.heads` selects."""
    p.add_argument("--k", default=None, metavar="K|auto",
                   help="heads to select: an integer, or auto (the knee of the sorted positive Δπ, clamped to "
                   f"4..32); default {default}")


def one_device(args: argparse.Namespace, command: str) -> None:
    """Commands that time or train on a single device refuse --device-map with one clear line."""
    if args.device_map is not None:
        from ..errors import PearError

        raise PearError(f"{command} runs on one device; --device-map is not supported")
