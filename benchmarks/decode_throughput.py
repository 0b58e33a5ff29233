"""Evaluation throughput: eager greedy decoding vs `--decode static` and `continuous`, `--prefill packed`.

    python3 benchmarks/decode_throughput.py --model smollm2-135m --device cuda --dtype bf16 \\
        --task mdqa-10 --limit 100 --out benchmarks/results/decode_throughput_h200.json

Both paths score the same examples through the harness (`pear.evaluate.scoring.run_task`, as
`pear eval` does: same batches, same early stop at the answer's first line). Eager runs once
after a small warm-up; each other path (`--decoders`: static, a static KV cache with the step
compiled into CUDA graphs; continuous, finished rows replaced by waiting prompts; packed, the
prompts of a batch prefilled as one row without padding, then the eager loop; continuous+packed,
both: the joining prompts prefilled packed; compiled and continuous+compiled, the same with the
decoder blocks compiled for the prompts, `--prefill compiled`; continuous-static, continuous
batching on a static cache with the step compiled into CUDA graphs, and continuous-static+packed /
+compiled; wherever packed or compiled goes, packed-shared / compiled-shared, the prefixes that prompts
read together share computed once) runs twice (compiled's first run includes compiling the blocks):
static's (and continuous-static's) first run includes compiling the step and recording its CUDA graphs, the second is
the steady state. Reported: examples/s of each run,
the answers that differ between the paths (16-bit rounding can flip a near-tie; in fp32 none
should), accuracy under each, peak GPU memory, the time of the prompts alone (one new token:
the floor of any decoding loop; under packed and compiled too, as their "prompts_only": what
packing, and compiling, save of the prefill), and the command, versions and hardware
(`pear.provenance`). If a path fails (compiling, say), the error is printed and saved under its
name and the exit status is 1; the other numbers are still written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
import traceback

import torch


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="folder, .gguf file or preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--task", default="mdqa-10")
    ap.add_argument("--limit", type=int, default=100, help="first N questions (x the task's default positions)")
    ap.add_argument("--positions", default=None, help="gold positions (default: the task's)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--max-batch-tokens", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's budget")
    ap.add_argument("--decoders", default="static,continuous",
                    help="the paths compared with eager: static, continuous, packed, continuous+packed, compiled, "
                         "continuous+compiled, continuous-static, continuous-static+packed, continuous-static+compiled")
    ap.add_argument("--variant", default="none", help="evaluate the model under this variant (pear eval --variant)")
    ap.add_argument("--variant-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the variant, as pear eval takes it (repeatable)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="compile the static paths' step: auto = on CUDA only (as pear eval --decode static)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode ('none' for none)")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="compile with symbolic shapes from the start (one compilation instead of one per new size)")
    ap.add_argument("--out", required=True, metavar="FILE.json")
    return ap.parse_args(argv)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[object, float, float | None]:
    """(fn(), wall seconds, peak GPU GiB or None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, dt, peak


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    from pear.atomic import write_text
    from pear.evaluate.data import resolve_data_dir
    from pear.evaluate.generate import batch_limits
    from pear.evaluate.registry import BuildContext, build_task, parse_positions
    from pear.evaluate.scoring import render_prompts, run_task
    from pear.baselines import get_variant
    from pear.evaluate.continuous import ContinuousDecoder
    from pear.evaluate.continuous_static import ContinuousStaticDecoder
    from pear.evaluate.packed import PREFILLS, PackedDecoder, flash_shares_prefixes
    from pear.evaluate.static_decode import StaticDecoder
    from pear.commands.eval import parse_option
    from pear.hardware import announce
    from pear.loading import load_model
    from pear.provenance import provenance

    as_int = lambda v: v if v == "auto" else int(v)  # noqa: E731
    loaded = load_model(args.model, dtype=announce(args.device, args.dtype).dtype, device=args.device)
    model = loaded.model
    device = model.get_input_embeddings().weight.device
    task = build_task(args.task, BuildContext(resolve_data_dir(args.data_dir), limit=args.limit,
                                              positions=parse_positions(args.positions)))
    task.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    rows, tokens = batch_limits(model, as_int(args.batch_size), as_int(args.max_batch_tokens))
    rendered = render_prompts(loaded, task, "auto")
    kw = dict(batch_size=rows, max_batch_tokens=tokens, progress=False, rendered=rendered)
    variant, options = get_variant(args.variant), dict(parse_option(o) for o in args.variant_option)
    variant.check_options(options)
    wrapped = contextlib.ExitStack()  # the model under the variant until the end (then restored)
    lm = wrapped.enter_context(variant.wrap(loaded, **options))

    def run(decoder=None):
        return run_task(lm, loaded, task, decoder=decoder, **kw)

    res = {"command": "python3 benchmarks/decode_throughput.py " + shlex.join(argv),
           "model": args.model, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           "variant": args.variant, "variant_options": options, "task": args.task, "limit": args.limit, "positions": args.positions, "max_new_tokens": task.max_new_tokens,
           "batch_limits": {"rows": rows, "tokens": tokens}, **provenance(device)}

    # eager: a warm-up on a few examples (kernels, allocator), then the timed run
    import dataclasses

    small = dataclasses.replace(task, examples=task.examples[:8])
    run_task(lm, loaded, small, batch_size=rows, max_batch_tokens=tokens, progress=False,
             rendered=(rendered[0][:8], rendered[1][:8]))
    eager, dt, peak = timed(run, device)
    n = sum(not r["skipped"] for r in eager)
    res["examples"], res["skipped"] = n, len(eager) - n
    res["eager"] = _summary(eager, dt, peak)
    print(f"eager:  {n} examples in {dt:.1f} s = {n / dt:.2f} examples/s", flush=True)

    # the floor no decoding loop can go under: the prompts alone (one new token each)
    one = dataclasses.replace(task, max_new_tokens=1)
    _, dt0, _ = timed(lambda: run_task(lm, loaded, one, **kw), device)
    res["prompts_only"] = {"seconds": round(dt0, 3), "examples_per_s": round(n / dt0, 3),
                           "max_speedup": round(dt / dt0, 3)}
    print(f"prompts only (1 new token): {dt0:.1f} s = {n / dt0:.2f} examples/s, the most any decoding loop "
          f"can gain: x{dt / dt0:.2f}", flush=True)

    rc = 0
    for name in [d.strip() for d in args.decoders.split(",") if d.strip()]:
        try:
            compiling = dict(compile={"auto": None, "on": True, "off": False}[args.compile], backend=args.compile_backend,
                             mode=None if args.compile_mode == "none" else args.compile_mode,
                             dynamic=True if args.compile_dynamic else None)
            base, _, prefill = name.partition("+")
            if name == "static":
                dec = StaticDecoder(model, **compiling)
            elif base == "continuous-static" and prefill in ("", *PREFILLS):
                dec = ContinuousStaticDecoder(model, prefill or "padded", **compiling)
            elif name == "continuous":
                dec = ContinuousDecoder()
            elif name in PREFILLS:
                dec = PackedDecoder(name)
            elif name.startswith("continuous+") and name.partition("+")[2] in PREFILLS:
                dec = ContinuousDecoder(name.partition("+")[2])
            else:
                raise ValueError(f"unknown decoder {name!r} (static, continuous, packed, continuous+packed, compiled, "
                                 "continuous+compiled, continuous-static[+packed|+compiled], each packed or compiled also "
                                 "as packed-shared or compiled-shared)")
            first, dt1, _ = timed(lambda: run(dec), device)
            again, dt2, peak2 = timed(lambda: run(dec), device)
            differ = [(e["id"], e["condition"], e["output"], s["output"]) for e, s in zip(eager, again)
                      if not e["skipped"] and e["output"] != s["output"]]
            res[name] = {**_summary(again, dt2, peak2),
                         "first_run": {"seconds": round(dt1, 3), "examples_per_s": round(n / dt1, 3)},
                         "runs_agree": [r["output"] for r in first] == [r["output"] for r in again],
                         "speedup": round(dt / dt2, 3),
                         "outputs_differ_from_eager": len(differ),
                         "differing_examples": [dict(zip(("id", "condition", "eager", name), d)) for d in differ[:20]]}
            if name.endswith("-shared"):  # whether this device's kernel took the shared prefixes (else none shared)
                res[name]["shares_prefixes"] = flash_shares_prefixes(str(device), next(model.parameters()).dtype)
            if isinstance(dec, StaticDecoder):
                res[name].update(compiled=dec.compiled, compile=({"backend": args.compile_backend,
                                                                  "mode": args.compile_mode,
                                                                  "dynamic": bool(args.compile_dynamic)}
                                                                 if dec.compiled else None))
                if name == "static":
                    res["speedup"] = res[name]["speedup"]
            print(f"{name}: {n} examples in {dt2:.1f} s = {n / dt2:.2f} examples/s (first run: {dt1:.1f} s); "
                  f"x{dt / dt2:.2f}; {len(differ)} of {n} answers differ from eager", flush=True)
            if name in PREFILLS:  # the prompts alone, packed (or compiled): against the padded prompts_only above
                _, dt3, _ = timed(lambda: run_task(lm, loaded, one, decoder=dec, **kw), device)
                res[name]["prompts_only"] = {"seconds": round(dt3, 3), "examples_per_s": round(n / dt3, 3)}
                print(f"{name} prompts only (1 new token): {dt3:.1f} s = {n / dt3:.2f} examples/s "
                      f"(padded: {dt0:.1f} s)", flush=True)
        except Exception as e:  # compiling or running a path failed: say so, keep the other numbers
            res[name] = {"error": f"{type(e).__name__}: {e}".strip()[:2000], "traceback": traceback.format_exc()[-4000:]}
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  file=sys.stderr, flush=True)
            rc = 1
    wrapped.close()
    write_text(args.out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rc


def _summary(records: list[dict], seconds: float, peak_gib: float | None) -> dict:
    done = [r for r in records if not r["skipped"]]
    return {"seconds": round(seconds, 3), "examples_per_s": round(len(done) / seconds, 3),
            "accuracy": round(sum(r["score"] for r in done) / max(1, len(done)), 4),
            "new_tokens": sum(r.get("n_new_tokens", 0) for r in done),
            "peak_gib": None if peak_gib is None else round(peak_gib, 2)}


if __name__ == "__main__":
    from pear.errors import PearError

    try:
        raise SystemExit(main())
    except PearError as e:  # bad input (model, data folder, task): one line, nothing written
        print(f"decode_throughput: error: {e}", file=sys.stderr)
        raise SystemExit(2)
