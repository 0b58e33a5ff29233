"""Does excluding cuDNN's SDPA kernel change how long head discovery takes? (BENCHMARKS.md §1)

    python3 benchmarks/backend_check.py {default,nocudnn} [--shape llama2-7b] [--device cuda]

Builds the random-initialised model of `--shape` and runs discovery three times in this one
process (fast, fast again, exact), printing seconds from an idle device and the top 5 heads.
`nocudnn` wraps the calls in the backend selection discovery now applies itself
(pear.backends.attention_backends); `default` lifts it inside discovery, so cuDNN may be used.
Run each mode in its own process: the first call of a process pays one-time costs (cuDNN
plans among them), the second shows the steady state. Results: benchmarks/results/backend_check_h100.txt
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

import pear.discover  # noqa: E402
from pear.backends import attention_backends  # noqa: E402


def main(argv=None) -> list[tuple[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["default", "nocudnn"])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(shapes.SHAPES))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    model = shapes.build(args.shape, device=args.device, dtype=dtype, attn_implementation="sdpa", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # default: discovery's own backend selection becomes a no-op, so every kernel is allowed
    lifted = mock.patch.object(pear.discover, "attention_backends", contextlib.nullcontext)
    times = []
    with attention_backends() if args.mode == "nocudnn" else lifted:
        for method in ["fast", "fast", "exact"]:
            sync()
            t = time.perf_counter()
            r = pear.discover.discover(model, None, method=method, k=20, progress=False)
            sync()
            times.append((method, time.perf_counter() - t))
            print(args.mode, args.shape, method, round(times[-1][1], 2), r.top(5), flush=True)
    return times


if __name__ == "__main__":
    main()
