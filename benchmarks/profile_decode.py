"""Profile the evaluation harness's greedy decoding (torch profiler): where does a step go?

    python3 benchmarks/profile_decode.py --model smollm2-135m --device cuda --batch 512 --task closedbook
    python3 benchmarks/profile_decode.py --model qwen2.5-coder-0.5b --device cuda --task mdqa-10 \
        --batch 512 --new-tokens 1      # the prompts alone (prefill)
    python3 benchmarks/profile_decode.py --model qwen2.5-coder-0.5b --device cuda --task mdqa-10 \
        --batch 512 --new-tokens 1 --prefill packed   # the same, packed into one row (pear eval --prefill packed)
        ... --prefill compiled                         # packed, the decoder blocks compiled
    python3 benchmarks/profile_decode.py --model qwen2.5-coder-0.5b --device cuda --task mdqa-10 \
        --batch 2048 --new-tokens 100 --decode continuous-static --prefill compiled --stop task --slots 512
        # continuous batching on a static cache (pear eval --decode continuous-static), stopping as pear eval does;
        # also times its phases apart (the joining prompts' prefill, the decoding steps, the rest of the loop)

Prints wall seconds per decoding step, the top operators by self CPU and CUDA time, and the GPU
time by kind of kernel (matrix products, attention, the rest: normalisation, activations,
rotations, copies), which says whether a faster prefill needs fused elementwise kernels
(torch.compile) or a faster attention kernel.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from pear.evaluate.runner import PREFILLS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--task", default="closedbook")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=30, help="1: the prompts alone (prefill)")
    ap.add_argument("--max-batch-tokens", type=int, default=10**9,
                    help="as pear eval's: rows x (longest prompt + new tokens) per batch")
    ap.add_argument("--variant", default="none")
    ap.add_argument("--prefill", default="padded", choices=PREFILLS,
                    help="packed: the prompts in one row, variable-length attention (pear eval --prefill packed); "
                         "compiled: packed, the decoder blocks compiled (pear eval --prefill compiled; the warm-up "
                         "compiles them); *-shared: prefixes that prompts share computed once")
    ap.add_argument("--decode", default="eager", choices=["eager", "continuous-static"],
                    help="the decoding loop profiled: eager (greedy_generate, every row to --new-tokens) or "
                         "continuous-static (pear eval --decode continuous-static: --batch prompts through --slots row "
                         "slots; the warm-up compiles its step)")
    ap.add_argument("--slots", type=int, default=512, help="continuous-static: rows decoded at once")
    ap.add_argument("--stop", default="none", choices=["none", "task"],
                    help="none: every row decodes --new-tokens; task: rows stop at the model's EOS and when the task's "
                         "answer is settled (its first line complete), as pear eval stops them")
    ap.add_argument("--rows", type=int, default=25, help="profiler rows to print")
    ap.add_argument("--out", help="also save the timings and the GPU time by kind here (JSON), with the "
                                  "command, versions and hardware")
    args = ap.parse_args(argv)

    from pear.baselines import get_variant
    from pear.evaluate.continuous_static import ContinuousStaticDecoder
    from pear.evaluate.generate import eos_token_ids, greedy_generate
    from pear.evaluate.packed import PREFILLS
    from pear.evaluate.registry import BuildContext, build_task
    from pear.evaluate.data import resolve_data_dir
    from pear.evaluate.runner import render_prompts
    from pear.loading import load_model
    from pear.provenance import provenance

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    task = build_task(args.task, BuildContext(resolve_data_dir(None), limit=args.batch))
    _, ids = render_prompts(loaded, task, "auto")
    ids = ids[: args.batch]
    tok = loaded.tokenizer
    kw = dict(pad_id=tok.pad_token_id, eos_ids=set(), max_new_tokens=args.new_tokens, device=args.device,
              batch_size=args.batch, max_batch_tokens=args.max_batch_tokens)
    if args.stop == "task":  # pear eval's stopping rule (scoring.score_generate)
        kw.update(eos_ids=eos_token_ids(loaded.model, tok), done=lambda j, new: task.done is not None and task.done(
            tok.decode(new, skip_special_tokens=True), task.examples[j]))
    res = {"command": "python3 benchmarks/profile_decode.py " + shlex.join(argv), "prefill": args.prefill,
           "decode": args.decode, "stop": args.stop, "rows": len(ids), "prompt_tokens": sum(map(len, ids)),
           "seconds": {}, **provenance(args.device)}
    with get_variant(args.variant).wrap(loaded) as lm:
        if args.decode == "continuous-static":
            dec = ContinuousStaticDecoder(lm, args.prefill)
            generate = lambda rows, **k: dec.generate(lm, rows, **{**k, "batch_size": args.slots})  # noqa: E731
        else:
            generate = lambda rows, **k: greedy_generate(lm, rows, compact=False,  # noqa: E731
                                                         prefill=PREFILLS.get(args.prefill), **k)
        generate(ids[:8], **{**kw, "max_new_tokens": 3})  # warm-up (compiles what is compiled)
        if args.decode == "continuous-static":
            generate(ids, **kw)  # compiles the step for the timed runs' cache shape
            res["phases"] = phases(dec, lambda: generate(ids, **kw), args.device)
            print("phases: " + ", ".join(f"{k} {v:.3f}" for k, v in res["phases"].items()), flush=True)
        for n in sorted({1, args.new_tokens}):
            torch.cuda.synchronize() if args.device.startswith("cuda") else None
            t = time.perf_counter()
            outs = generate(ids, **{**kw, "max_new_tokens": n})
            torch.cuda.synchronize() if args.device.startswith("cuda") else None
            res["seconds"][f"{n} new tokens"] = dt = time.perf_counter() - t
            res.setdefault("new_tokens", {})[f"{n} new tokens"] = sum(map(len, outs))
            print(f"{len(ids)} rows, {n} new tokens at most: {dt:.3f} s, {sum(map(len, outs))} new tokens")
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if args.device.startswith("cuda") else [])
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            generate(ids, **kw)
            torch.cuda.synchronize() if args.device.startswith("cuda") else None
            res["profiled_seconds"] = time.perf_counter() - t  # wall time under the profiler, against its GPU time
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.device.startswith("cuda"):
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
        kinds = gpu_time_by_kind(prof)
        total = sum(kinds.values()) or 1.0
        print("GPU time by kind of kernel: " + ", ".join(f"{k} {v / 1e3:.1f} ms ({v / total:.0%})"
                                                          for k, v in kinds.items()))
        res["gpu_ms_by_kind"] = {k: v / 1e3 for k, v in kinds.items()}
        print(f"GPU busy {total / 1e6:.2f} s of {res['profiled_seconds']:.2f} s wall under the profiler")
        # the longest kernels with the kind each was given, so the grouping can be checked from the file
        res["top_kernels"] = [{"kernel": n, "ms": us / 1e3, "kind": k} for n, us, k in gpu_kernels(prof)[:args.rows]]
    if args.out:
        from pear.atomic import write_text

        write_text(args.out, json.dumps(res, indent=2) + "\n")
    return 0


def phases(dec, run, device: str) -> dict[str, float]:
    """Wall seconds of one continuous-static run split by phase, each timed between CUDA
    synchronisations: the joining prompts' prefill (with placing their keys in the cache), the
    decoding steps (the compiled step's replay), and the rest (the loop's own Python: stopping
    rules, joins' bookkeeping, cache moves); steps and joins are counted. The synchronisations take
    away the loop's overlap of its Python with the queued step, so the parts add up to more than an
    unobserved run."""
    from pear.evaluate import continuous_static as cs

    spent = {"prefill_s": 0.0, "step_s": 0.0, "steps": 0, "joins": 0}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, key, count=None):
        def wrapped(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[key] += time.perf_counter() - t
            if count:
                spent[count] += 1
            return out
        return wrapped

    prefiller, place, step = cs.prefiller, cs._place, type(dec).__call__
    cs.prefiller = lambda *a, **k: timed(prefiller(*a, **k), "prefill_s", "joins")
    cs._place = timed(place, "prefill_s")
    type(dec).__call__ = timed(step, "step_s", "steps")
    try:
        sync()
        t = time.perf_counter()
        run()
        sync()
        total = time.perf_counter() - t
    finally:
        cs.prefiller, cs._place, type(dec).__call__ = prefiller, place, step
    return {"total_s": total, **spent, "rest_s": total - spent["prefill_s"] - spent["step_s"],
            "ms_per_step": 1e3 * spent["step_s"] / max(1, spent["steps"])}


KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
         ("matrix products", ("gemm", "cutlass", "sm90", "xmma", "cublas", "matmul", "nvjet")),
         ("copies", ("copy", "memcpy", "memset", "cat", "index")))


REST = "the rest (elementwise, normalisation, reductions)"


def gpu_kernels(prof) -> list[tuple[str, float, str]]:
    """(kernel name, device time in us, kind) of each profiled GPU kernel, longest first; kinds are
    matched by name in KINDS' order (an attention kernel built on a matrix-product template counts
    as attention). Only the kernels themselves are listed: an operator (aten::mm) reports its
    kernels' time as its own device time too, so summing operators and kernels would count each
    kernel twice."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if e.device_type not in (DeviceType.CUDA, DeviceType.HIP):
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        name = e.key.lower()
        rows.append((e.key, us, next((k for k, words in KINDS if any(w in name for w in words)), REST)))
    return sorted(rows, key=lambda r: -r[1])


def gpu_time_by_kind(prof) -> dict[str, float]:
    """Device time (us) of the GPU kernels (`gpu_kernels`), summed by kind."""
    out = {k: 0.0 for k, _ in KINDS} | {REST: 0.0}
    for _, us, kind in gpu_kernels(prof):
        out[kind] += us
    return out


if __name__ == "__main__":
    raise SystemExit(main())
