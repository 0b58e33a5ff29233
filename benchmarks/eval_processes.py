"""Evaluation throughput with several processes on one GPU (`torchrun --nproc-per-node N -m pear eval`).

    python3 benchmarks/eval_processes.py --model qwen2.5-coder-0.5b --task mdqa-10 --limit 200 \\
        --processes 1,2,3,4 --device cuda --dtype bf16 --out benchmarks/results/eval_processes/qwen2.5-coder-0.5b_h200.json

Why: decoding is Python-bound (BENCHMARKS.md §3c), so processes that share one GPU keep it busier
than one process can. `pear eval` splits each part's batches between the processes (whole
batches, so every example is scored in the same batch as in one process) and rank 0 writes the
results; with several processes on one GPU they talk over gloo (`pear.distributed`). For each N
this runs the same command (the first N = 1 without a launcher), reads the scoring time that
`pear eval` records (model loading excluded) and every example's output (`--log-samples`), and
reports examples/s, the ratio to the first run, and the outputs that differ from the first run's
(none are expected at the same batch size: same batches, same kernels). Saved with the commands,
versions and hardware.

Whole batches are the unit of work, so N processes can only all be busy when a part holds at
least N batches: 1,000 mdqa-10 examples at `pear eval`'s automatic 512 rows are two batches,
and a third process has nothing to do. `N:B` runs N processes at B rows per batch (e.g.
`1,4:128`); other batches pad differently, so in bf16 a few greedy outputs may differ from the
first run's, and the count says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def command(n: int, batch: int | None, args, out: Path) -> list[str]:
    launch = [sys.executable, "-m", "pear"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "pear"]
    cmd = launch + ["eval", "--model", args.model, "--task", args.task, "--limit", str(args.limit), "--device",
                    args.device, "--dtype", args.dtype, "--decode", args.decode, "--seed", "0", "--no-progress",
                    "--log-samples", "--bootstrap", "100", "--out", str(out)]
    cmd += ["--batch-size", str(batch)] if batch else []
    return cmd + (["--data-dir", args.data_dir] if args.data_dir else [])


def outputs(out: Path) -> dict:
    """Every example's output, from the .samples.jsonl.gz file `pear eval --log-samples` writes."""
    import gzip

    with gzip.open(out.with_name(out.stem + ".samples.jsonl.gz"), "rt") as f:
        return {(s["id"], s["condition"]): s["output"] for s in map(json.loads, f)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="folder, .gguf file or preset")
    ap.add_argument("--task", default="mdqa-10")
    ap.add_argument("--limit", type=int, default=200, help="first N questions (x the task's default positions)")
    ap.add_argument("--processes", default="1,2,3,4",
                    help="runs to compare, N or N:B (N processes, B rows per batch; default: pear eval's own); "
                         "the first is the reference")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--decode", default="eager", choices=["eager", "static"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from pear.atomic import write_text
    from pear.provenance import provenance

    runs = [(int(n), int(b) if b else None) for n, _, b in (x.partition(":") for x in args.processes.split(","))]
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (n, batch) in enumerate(runs):
            out = Path(tmp) / f"run{i}" / "eval.json"
            cmd = command(n, batch, args, out)
            env = dict(os.environ, PEAR_CACHE=str(Path(tmp) / "cache"), PYTHONPATH=os.pathsep.join(
                [str(REPO), os.environ.get("PYTHONPATH", "")]))
            if n > 1 and args.device == "cpu":
                env["OMP_NUM_THREADS"] = "1"
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"error: {n} process(es) failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            res = json.loads(out.read_text())
            t = next(iter(res["timing"].values()))[args.task]
            if not t["examples"]:
                print(f"error: no example of {args.task} fits the model's window", file=sys.stderr)
                return 1
            outs = outputs(out)
            ref = ref or (outs, t["examples_per_s"])
            differ = sorted(k for k in outs if outs[k] != ref[0].get(k))
            shown = ["pear"] + cmd[3:] if n == 1 else ["torchrun"] + cmd[3:]  # as a user types it
            rows.append({"processes": n, "batch_size": batch or "auto", "command": shlex.join(shown),
                         "seconds": t["seconds"], "examples": t["examples"], "examples_per_s": t["examples_per_s"],
                         "x_first": round(t["examples_per_s"] / ref[1], 3), "outputs_differing": len(differ),
                         "differing": [list(k) for k in differ[:20]]})
            print(f"{n} process(es), batch {batch or 'auto'}: {t['examples']} examples in {t['seconds']:.1f} s, "
                  f"{t['examples_per_s']:.1f}/s, x{rows[-1]['x_first']:.2f}, {len(differ)} outputs differ", flush=True)
    import torch

    dev = torch.device("cuda" if args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    res = {"settings": {"command": shlex.join([sys.executable, *sys.argv]), **vars(args), **provenance(dev)},
           "runs": rows}
    write_text(args.out, json.dumps(res, indent=1) + "\n")
    print("| processes | rows per batch | examples/s | × first | outputs differing |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} | {r['batch_size']} | {r['examples_per_s']:.1f} | {r['x_first']:.2f} "
              f"| {r['outputs_differing']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
