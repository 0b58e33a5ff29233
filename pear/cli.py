"""The `pear` command: the subcommands live in `pear.commands`, one module each (`add_cli`).

Errors the user can fix (`PearError`, missing files, bad options) and errors of the
environment (a full disk, a read-only folder: any OSError) print one line and exit with
code 2 (``-v`` prints the traceback too); Ctrl-C exits with 130. Only the chosen command's
module is imported, so ``pear --help`` does not wait for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import PearError

# Command -> (module in pear.commands defining `add_cli(subparsers)`, one-line help); order is --help's order.
COMMANDS = {
    "fold": ("pear.commands.fold", "fold head coefficients into the weights and save a checkpoint"),
    "inspect": ("pear.commands.inspect", "show family, layers, heads, KV heads, head_dim, position embedding"),
    "discover": ("pear.commands.discover", "score every attention head by Δπ on the proxy copying task"),
    "fit": ("pear.commands.fit", "learn one coefficient per selected head on the proxy task"),
    "run": ("pear.commands.run", "the whole method: discover -> fit -> fold -> verify -> save"),
    "eval": ("pear.commands.eval", "evaluate models on long-context QA, KV retrieval, MMLU, ..."),
    "bench": ("pear.commands.bench", "measure speed and memory (bench overhead)"),
    "baseline": ("pear.commands.baseline", "train a baseline's parameters (baseline train moice)"),
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the command in `argv` (all of them when argv is None); the others
    are one-line entries, so --help lists them without importing their modules."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pear", description="PEAR: re-weight attention heads so LLMs read their context better, "
        "folded into an ordinary checkpoint.")
    parser.add_argument("--version", action="version", version=f"pear {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _chosen(argv) if argv is not None else None
    for name, (module, help_) in COMMANDS.items():
        if argv is None or name == chosen:
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="pear: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _watch_interrupts()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: join before loading
            from .distributed import init

            init()
        rc = args.func(args)
    except PearError as e:
        return _fail(str(e), args.verbose)
    except FileNotFoundError as e:
        return _fail(f"file not found: {e.filename or e}", args.verbose)
    except OSError as e:  # the environment: a full disk, a read-only folder, a file that vanished
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or type(e).__name__}{where}", args.verbose)
    except KeyboardInterrupt:
        print("pear: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


INTERRUPT_GRACE_S = 3.0
_WAKEUP: list = []


def _watch_interrupts(grace: float = INTERRUPT_GRACE_S) -> None:
    """Make Ctrl-C act within seconds, even inside one long C++ call.

    Python handles SIGINT between bytecodes, so a backward pass or a big matmul that runs for
    minutes (bf16 emulated on a CPU without it) ignores Ctrl-C until it returns. The C-level
    handler still writes the signal number to the wakeup fd at once: a watcher thread reads it,
    and if the Python handler has not run `grace` seconds later, exits (code 130). Nothing is
    left that looks complete: outputs are written atomically, and the temporary files of a dead
    process are removed by the next write of the same target; fits resume from their checkpoint.
    """
    import signal
    import socket
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # already watched, or someone else (an embedding program) owns Ctrl-C
    counts = {"received": 0, "handled": 0}

    def on_sigint(signum, frame):
        counts["handled"] += 1
        raise KeyboardInterrupt

    r, w = socket.socketpair()
    w.setblocking(False)
    try:
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except ValueError:
        return
    signal.signal(signal.SIGINT, on_sigint)
    _WAKEUP[:] = [r, w]  # the sockets must outlive this function: the C handler writes to w

    def watch():
        while True:
            try:
                data = r.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT not in data:
                continue
            counts["received"] += data.count(signal.SIGINT)
            time.sleep(grace)
            if counts["handled"] < counts["received"]:
                os.write(2, b"pear: interrupted (in the middle of a computation)\n")
                os._exit(130)

    threading.Thread(target=watch, name="pear-interrupt-watch", daemon=True).start()


def _fail(message: str, verbose: bool) -> int:
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"pear: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
