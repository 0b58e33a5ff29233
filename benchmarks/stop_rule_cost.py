"""The host time a decoding step spends on the stopping rule, with and without `Task.done_on`'s gate.

    python3 benchmarks/stop_rule_cost.py --model smollm2-135m --rows 512 \\
        --out benchmarks/results/stop_rule_cost_cpu.json

A decoding step hands every running row's new token to `generate.take_tokens`, which asks the task's
`done` whether the answer is settled; for QA that decodes the row's whole answer. With 512 rows per
step (continuous batching keeps them full) this is host time the GPU waits for. Here the same rows
and tokens (answers of 0-40 random tokens so far, new tokens drawn at random, seeded) go through
`take_tokens` with `done` asked at every token and with the harness's gate (`scoring.tokens_holding`:
asked only at tokens whose text holds a newline), and the milliseconds per step are printed and saved
with the command, versions and hardware. No model runs: only the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer (folder, .gguf file or preset)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="FILE.json")
    args = ap.parse_args(argv)

    from pear.evaluate.generate import take_tokens
    from pear.evaluate.metrics import QA_DONE_ON, qa_done
    from pear.evaluate.scoring import tokens_holding
    from pear.loading import load_model
    from pear.provenance import provenance

    tok = load_model(args.model, dtype="fp32", device="cpu").tokenizer
    t0 = time.perf_counter()
    gate = tokens_holding(tok, QA_DONE_ON)
    res = {"command": "python3 benchmarks/stop_rule_cost.py " + shlex.join(argv), "model": args.model,
           "rows": args.rows, "steps": args.steps, "seed": args.seed, "gate_tokens": len(gate),
           "gate_seconds": round(time.perf_counter() - t0, 3), "ms_per_step": {}, **provenance("cpu")}
    for name, gated in (("every token", False), ("gated", True)):
        rng = random.Random(args.seed)
        out = [[rng.randrange(1000, len(tok)) for _ in range(rng.randrange(0, 40))] for _ in range(args.rows)]
        steps = [torch.tensor([rng.randrange(1000, len(tok)) for _ in range(args.rows)]) for _ in range(args.steps)]
        fin, rows, eos = [False] * args.rows, list(range(args.rows)), torch.tensor([-1])

        def done(i, new, gated=gated):
            if gated and new[-1] not in gate:
                return False
            return qa_done(tok.decode(new, skip_special_tokens=True))

        t = time.perf_counter()
        for nxt in steps:
            take_tokens(nxt, eos, rows, fin, out, done)
        res["ms_per_step"][name] = round((time.perf_counter() - t) / args.steps * 1e3, 3)
        print(f"{name}: {res['ms_per_step'][name]:.2f} ms per step at {args.rows} rows", flush=True)
    if args.out:
        from pear.atomic import write_text

        write_text(args.out, json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
