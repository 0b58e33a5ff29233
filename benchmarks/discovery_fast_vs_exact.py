"""Fast (attribution patching + exact re-check of the top M) vs exact head discovery.

    python3 benchmarks/discovery_fast_vs_exact.py --threads 1          # SmolLM2-135M, bf16, CPU
    python3 benchmarks/discovery_fast_vs_exact.py --threads 1 --fp32-check 10   # then: bf16 vs fp32 scores
    python3 benchmarks/discovery_fast_vs_exact.py --device cuda \
        --out benchmarks/results/discovery_fast_vs_exact_cuda.json                # GPU (batched heads)

Runs both methods on the same model, proxy settings and seed, and a naive one-forward-per-
head loop on a few heads (to check the exact scores on the real model and to time the
naive method per head). Saves:
  benchmarks/results/discovery_fast_vs_exact.json   Spearman, top-K overlaps, seconds, forward-equivalents
  benchmarks/results/smollm2-135m_heads_{exact,fast}.json/.png   both heads files and heatmaps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import pear
from pear.discover import discover, naive_scores
from pear.proxy import parse_settings

RESULTS = Path(__file__).resolve().parent / "results"


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as in Spearman's rho."""
    x = x.flatten().double()
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.double)
    for v in x.unique():  # ties
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def fp32_check(args, settings, n: int) -> dict:
    """Exact scores of the bf16 exact top-n heads recomputed with the fp32 model: how much
    does running discovery in bf16 move the scores? Added to an existing results file."""
    from pear.discover import clean_pass, proxy_batches
    from pear.discover.exact import _exact

    out = Path(args.out)
    result = json.loads(out.read_text())
    heads = [tuple(k) for k in result["exact_top"][:n]]
    model, tok = pear.load_model(args.model, dtype="fp32", device=args.device)
    arch = pear.resolve(model)
    (scores, _), secs, _ = timed(lambda: _exact(model, arch, [clean_pass(model, b, arch=arch) for b in
                                                              proxy_batches(model, tok, settings, args.seed)],
                                                heads, None, None))
    fp32 = [float(scores[k]) for k in heads]
    bf16 = result["exact_top_scores"][:n]
    result["fp32_check"] = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "heads": [list(k) for k in heads], "bf16": bf16, "fp32": [round(x, 5) for x in fp32],
        "max_abs_diff": round(max(abs(a - b) for a, b in zip(fp32, bf16)), 5),
        "spearman": spearman(torch.tensor(fp32), torch.tensor(bf16)), "seconds": round(secs, 1)}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result["fp32_check"], indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", default=None, help="default: the paper's 20x50,40x25,80x15,100x10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10, help="K for the default M = max(4K, 32)")
    ap.add_argument("--naive-heads", type=int, default=3, help="heads checked (and timed) with the naive loop")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); 1 was 2x faster on our busy 2-core machine")
    ap.add_argument("--out", default=str(RESULTS / "discovery_fast_vs_exact.json"))
    ap.add_argument("--fp32-check", type=int, default=0, metavar="N",
                    help="only re-score the exact top N of an existing --out file with the fp32 model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fp32_check:
        return fp32_check(args, parse_settings(args.settings), args.fp32_check)

    torch.manual_seed(args.seed)
    settings = parse_settings(args.settings)
    load_before = os.getloadavg()
    model, tok = pear.load_model(args.model, dtype=args.dtype, device=args.device)
    arch = pear.resolve(model)
    name = args.model.replace("/", "_") + ("" if args.device == "cpu" else f"_{args.device.replace(':', '')}")
    RESULTS.mkdir(parents=True, exist_ok=True)

    fast, fast_s, fast_cpu = timed(lambda: discover(model, tok, settings=settings, method="fast", seed=args.seed,
                                                    k=args.k, model_spec=args.model))
    fast.save(RESULTS / f"{name}_heads_fast.json")
    print(f"fast: {fast_s:.1f} s, {fast.forward_equivalents:.1f} forward-equivalents", flush=True)
    exact, exact_s, exact_cpu = timed(lambda: discover(model, tok, settings=settings, method="exact",
                                                       seed=args.seed, k=args.k, model_spec=args.model))
    exact.save(RESULTS / f"{name}_heads_exact.json")
    print(f"exact: {exact_s:.1f} s, {exact.forward_equivalents:.1f} forward-equivalents", flush=True)

    # naive loop on the exact top heads: same scores? and what does one head cost that way?
    check = exact.top(args.naive_heads)
    naive, naive_s, naive_cpu = timed(lambda: naive_scores(model, tok, settings, args.seed, heads=check))
    naive_vs_exact = {f"L{l}H{h}": [float(naive[l, h]), float(exact.scores[l, h])] for l, h in check}
    n_heads = arch.n_total_heads
    # naive cost: per setting, one clean forward + one forward per head; extrapolate from the measured heads
    naive_full_s = naive_s * (1 + n_heads) / (1 + len(check))

    M = fast.extra["top_m"]
    cands = set(fast.ranking()[:M])
    overlaps = {str(K): len(set(fast.top(K)) & set(exact.top(K))) for K in (5, 10, 20)}
    in_cands = {str(K): len(set(exact.top(K)) & cands) for K in (5, 10, 20)}
    result = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model, "dtype": args.dtype, "device": args.device, "settings": [list(s) for s in settings],
        "seed": args.seed, "n_layers": arch.n_layers, "n_heads": arch.n_heads, "k": args.k, "top_m": M,
        "spearman_fast_vs_exact": spearman(fast.scores, exact.scores),
        "spearman_estimate_vs_exact": spearman(fast.estimates, exact.scores),
        "pearson_estimate_vs_exact": pearson(fast.estimates, exact.scores),
        "top_k_overlap": overlaps,
        "exact_top_k_in_fast_candidates": in_cands,
        "exact_top5_in_fast_candidates": in_cands["5"],
        "seconds": {"fast": round(fast_s, 1), "exact": round(exact_s, 1),
                    "naive_estimated_all_heads": round(naive_full_s, 1)},
        "cpu_seconds": {"fast": round(fast_cpu, 1), "exact": round(exact_cpu, 1),
                        "naive_estimated_all_heads": round(naive_cpu * (1 + n_heads) / (1 + len(check)), 1)},
        "forward_equivalents": {"fast": round(fast.forward_equivalents, 2), "exact": round(exact.forward_equivalents, 2),
                                "naive": 1 + n_heads},
        "naive_vs_exact_scores": naive_vs_exact,
        "exact_top": [list(k) for k in exact.top(20)],
        "exact_top_scores": [round(float(exact.scores[k]), 5) for k in exact.top(20)],
        "fast_top": [list(k) for k in fast.top(20)],
        "estimate_of_exact_top": [round(float(fast.estimates[k]), 5) for k in exact.top(20)],
        "n_positive": int((exact.scores > 0).sum()), "n_above_1pct": int((exact.scores > 0.01).sum()),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: result[k] for k in ("spearman_fast_vs_exact", "spearman_estimate_vs_exact", "top_k_overlap",
                                             "exact_top_k_in_fast_candidates", "seconds", "forward_equivalents",
                                             "naive_vs_exact_scores")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
