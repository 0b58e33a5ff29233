"""Performance at real scale: discovery, fitting and inference overhead on model shapes.

    python3 benchmarks/perf_scale.py --shape llama2-7b --device cuda --out benchmarks/results/perf_llama2-7b.json
    python3 benchmarks/perf_scale.py --shape qwen2.5-32b --device-map auto --parts discover-fast,fit \
        --fit-steps 20 --out benchmarks/results/perf_qwen2.5-32b_x2.json
    python3 benchmarks/perf_scale.py --shape tiny --device cpu --out /tmp/perf_tiny.json   # CI runs this

Models are random-initialised from the real configurations' shape fields (benchmarks/shapes.py)
in bf16: time and memory depend on shapes, not trained values. Parts:
  discover-fast, discover-exact: all heads, the paper's four proxy settings; seconds,
      forward-equivalents, peak GPU memory.
  fit:      seconds per step and in total for `--fit-steps` steps of 20 sequences x 100 tokens.
  overhead: base vs PEAR-folded at `--context` tokens: prefill and decode tokens/s, interleaved
      trials (A B A B ...) so drift cancels; the folded ratio must be 1.00 within noise.
Results: one JSON with hardware, versions, the command line and every figure.
With `--profile`, each part runs a second time under the torch profiler (CPU and CUDA
activity); the operator tables are written beside the JSON (OUT.profile.txt) and each part's
top operators, by self device time (self CPU time on CPU), go into the JSON under "profile".
The timed run and the profiled run are separate: profiling slows the code it watches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

import pear  # noqa: E402
from pear.atomic import write_text  # noqa: E402
from pear.folding import fold, unfold  # noqa: E402


def sync(device):
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_gib() -> list[float]:
    if not torch.cuda.is_available():
        return []
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())]


def part_discover(model, method: str, args) -> dict:
    from pear.discover import discover

    sync(model.device)  # the clock starts on an idle GPU (building the model queues init kernels)
    reset_peak()
    t = time.perf_counter()
    res = discover(model, None, method=method, seed=args.seed, k=args.k, progress=not args.quiet)
    sync(model.device)
    sec = time.perf_counter() - t
    arch = pear.resolve(model)
    return {"seconds": round(sec, 2), "heads": arch.n_total_heads,
            "forward_equivalents": res.to_dict().get("forward_equivalents"),
            "peak_gib_per_gpu": peak_gib(), "top_k": [list(h) for h in res.top(args.k)]}


def part_fit(model, heads, args) -> dict:
    from pear.fit import FitSettings, fit

    settings = FitSettings(steps=args.fit_steps, batch=20, length=50, seed=args.seed,
                           micro_batch=args.micro_batch, grad_checkpointing=args.grad_checkpointing)
    sync(model.device)
    reset_peak()
    t = time.perf_counter()
    res = fit(model, None, heads, settings, progress=not args.quiet)
    sync(model.device)
    sec = time.perf_counter() - t
    return {"steps": args.fit_steps, "sequences_per_step": 20, "tokens_per_sequence": 100,
            "k": len(heads), "micro_batch": args.micro_batch, "grad_checkpointing": args.grad_checkpointing,
            "seconds_total_incl_heldout_eval": round(sec, 2), "seconds_training": round(res.seconds, 2),
            "seconds_per_step": round(res.seconds / max(1, res.step), 3),
            "peak_gib_per_gpu": peak_gib(), "loss_first_last": [res.losses[0], res.losses[-1]] if res.losses else None,
            "heldout_before_after": [res.before, res.after]}


@torch.no_grad()
def part_overhead(model, args) -> dict:
    """Interleave base and folded trials in one process; fold/unfold toggles the weights in place."""
    arch = pear.resolve(model)
    g = torch.Generator().manual_seed(args.seed)
    coefs = {(l, h): 0.5 + 0.5 * float(torch.rand(1, generator=g))
             for l in range(arch.n_layers) for h in range(0, arch.n_heads, max(1, arch.n_heads // 2))}
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, args.context), generator=g).to(model.device)
    times = {"base": {"prefill": [], "decode": []}, "pear": {"prefill": [], "decode": []}}
    peaks = {"base": [], "pear": []}

    def trial():
        sync(model.device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync(model.device)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(args.new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(model.device)
        return t1 - t0, time.perf_counter() - t1

    trial()  # warm-up
    for _ in range(args.trials):
        for variant in ("base", "pear"):
            if variant == "pear":
                fold(model, coefs)
            reset_peak()
            p, d = trial()
            peaks[variant].append(max(peak_gib() or [0.0]))
            times[variant]["prefill"].append(args.context / p)
            times[variant]["decode"].append(args.new_tokens / d)
            if variant == "pear":
                unfold(model, coefs)
    res = {}
    for v in times:
        res[v] = {k: round(statistics.median(x), 2) for k, x in times[v].items()}
        res[v]["peak_gib"] = max(peaks[v]) if peaks[v] else None
    res["ratio_pear_to_base"] = {k: round(res["pear"][k] / res["base"][k], 4) for k in ("prefill", "decode")}
    res["spread"] = {v: {k: round((max(x) - min(x)) / statistics.median(x), 4) for k, x in times[v].items()} for v in times}
    res.update(context=args.context, new_tokens=args.new_tokens, trials=args.trials,
               attn_implementation=model.config._attn_implementation)
    return res


def profiled(fn, device, rows: int = 15) -> tuple[str, list[dict]]:
    """Run fn() under the torch profiler: (printable table, top `rows` operators as dicts)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # torch >= 2.4 name
    avg = prof.key_averages()
    table = avg.table(sort_by=key, row_limit=rows * 2)
    total = sum(getattr(e, key) for e in avg) or 1.0
    top = sorted(avg, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return table, [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 2),
                    "share": round(getattr(e, key) / total, 4)} for e in top]


def rerun(part: str, model, heads, args):
    """A function repeating `part` quietly (fit: 3 steps; overhead: 1 trial), for the profilers."""
    quiet = argparse.Namespace(**{**vars(args), "quiet": True, "fit_steps": min(args.fit_steps, 3), "trials": 1})
    return {"discover-fast": lambda: part_discover(model, "fast", quiet),
            "discover-exact": lambda: part_discover(model, "exact", quiet),
            "fit": lambda: part_fit(model, heads, quiet),
            "overhead": lambda: part_overhead(model, quiet)}[part]


def py_profiled(fn, device, rows: int = 40) -> str:
    """Run fn() under cProfile: the functions with the most own time, then the most cumulative time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync(device)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(rows)
    st.sort_stats("cumulative").print_stats(rows)
    return buf.getvalue()


def save(result: dict, tables: list[str], pytables: list[str], path: str) -> None:
    """The JSON, and beside it the profiler tables (torch: .profile.txt, cProfile: .pyprofile.txt)."""
    out = Path(path)
    write_text(out, json.dumps(result, indent=2) + "\n")
    for suffix, tabs in ((".profile.txt", tables), (".pyprofile.txt", pytables)):
        if tabs:
            write_text(out.with_suffix(suffix), result["command"] + "\n\n" + "\n\n".join(tabs) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(shapes.SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--device-map", default=None)
    ap.add_argument("--parts", default="discover-fast,discover-exact,fit,overhead")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--fit-steps", type=int, default=60)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile each part (torch profiler), see above")
    ap.add_argument("--py-profile", action="store_true",
                    help="also run each part under cProfile: where the Python side spends its time (OUT.pyprofile.txt)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device != "cpu" or args.device_map else torch.float32
    t = time.perf_counter()
    model = shapes.build(args.shape, device=args.device, dtype=dtype, device_map=args.device_map,
                         attn_implementation=args.attn, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    build_s = time.perf_counter() - t
    result = {
        "command": "python3 " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "shape": args.shape, "config": shapes.SHAPES[args.shape][1], "dtype": str(dtype),
        "hardware": {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "pear": pear.__version__,
                     "transformers": __import__("transformers").__version__},
        "build_seconds": round(build_s, 1), "parts": {},
    }
    parts = args.parts.split(",")
    heads, tables, pytables = None, [], []
    for part in parts:
        print(f"== {part}", flush=True)
        if part in ("discover-fast", "discover-exact"):
            r = part_discover(model, part.split("-")[1], args)
            heads = heads or [tuple(h) for h in r["top_k"]]
        elif part == "fit":
            if heads is None:  # no discovery part run: any K heads cost the same
                arch = pear.resolve(model)
                heads = [(l % arch.n_layers, l // arch.n_layers) for l in range(args.k)]
            r = part_fit(model, heads, args)
        elif part == "overhead":
            r = part_overhead(model, args)
        else:
            raise SystemExit(f"unknown part {part}")
        result["parts"][part] = r
        print(json.dumps(r), flush=True)
        if args.profile:
            table, top = profiled(rerun(part, model, heads, args), args.device)
            result.setdefault("profile", {})[part] = top
            tables.append(f"== {part} ({'fit: 3 steps' if part == 'fit' else 'one run'})\n{table}")
            print(table, flush=True)
        if args.py_profile:
            pytables.append(f"== {part}\n{py_profiled(rerun(part, model, heads, args), model.device)}")
        save(result, tables, pytables, args.out)  # after every part: a later failure keeps what was measured
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
