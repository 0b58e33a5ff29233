r"""`pear eval`: several models on the same examples; results JSON, a table and a U-curve plot.

    pear eval --model smollm2-135m --model smollm2-135m --variant ms-poe --model runs/x/model \
              --task mdqa-10 --task mdqa-20 --task closedbook --limit 100 --out results/eval.json

`--variant`, `--variant-option` and `--label` attach to the `--model` just before them, e.g.
`--model smollm2-135m --variant ms-poe --variant-option min_ratio=1.2 --variant-option max_ratio=1.2`.

Several GPUs (data parallel: each process scores a share of the batches, rank 0 writes the files):
    torchrun --nproc-per-node 4 -m pear eval --model ... --task mdqa-10 --resume --out results/eval.json
    accelerate launch --num-processes 4 -m pear eval ...
"""

from __future__ import annotations

import argparse
import shlex

from ..errors import PearError


def _auto_or_int(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got '{text}'") from None


class _ModelAction(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        models = list(getattr(ns, "models", None) or [])
        models.append({"spec": value, "variant": "none", "label": None, "options": {}})
        ns.models = models


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE read as JSON where it parses (1.2, true, [1, 2]), a comma list of such
    values as a list (10000,20000), else as a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PearError(f"--variant-option must be KEY=VALUE, got '{text}'")

    def one(v: str):
        try:
            return json.loads(v)
        except ValueError:
            return v.strip()

    items = value.split(",") if "," in value and not value.lstrip().startswith("[") else None
    return key.strip(), [one(v) for v in items] if items is not None else one(value)


class _OptionAction(argparse.Action):
    """--variant-option KEY=VALUE: an option of the preceding --model's variant."""

    def __call__(self, parser, ns, value, option_string=None):
        models = getattr(ns, "models", None)
        if not models:
            parser.error(f"{option_string} must follow the --model it applies to")
        key, val = parse_option(value)
        models[-1]["options"][key] = val


class _AttachAction(argparse.Action):
    """--variant / --label: set on the most recent --model."""

    def __call__(self, parser, ns, value, option_string=None):
        models = getattr(ns, "models", None)
        if not models:
            parser.error(f"{option_string} must follow the --model it applies to")
        if models[-1][self.dest] not in (None, "none"):
            parser.error(f"two {option_string} options for --model {models[-1]['spec']}")
        models[-1][self.dest] = value


def add_cli(sub) -> None:
    from ..evaluate.registry import POSITION_HELP

    p = sub.add_parser("eval", help="evaluate models on long-context tasks (lost in the middle, KV, HotpotQA, MMLU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="models", action=_ModelAction, metavar="SPEC",
                   help="model (repeatable): folder, hub id, .gguf file or preset (default: smollm2-135m)")
    p.add_argument("--variant", dest="variant", action=_AttachAction, metavar="NAME",
                   help="inference-time variant of the preceding --model (pear.baselines; default none)")
    p.add_argument("--variant-option", dest="options", action=_OptionAction, metavar="KEY=VALUE",
                   help="option of the preceding --model's variant (repeatable), e.g. min_ratio=1.2 or "
                        "bases=10000,20000")
    p.add_argument("--label", dest="label", action=_AttachAction, metavar="NAME",
                   help="name of the preceding --model in tables and results (default: SPEC[+VARIANT])")
    p.add_argument("--task", action="append", metavar="TASK",
                   help="task (repeatable or comma-separated): mdqa[-K], oracle, kv[-N], hotpotqa, closedbook, "
                        "mmlu[-5shot]; --list-tasks shows them")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    p.add_argument("--export-lm-eval", metavar="DIR", default=None,
                   help="write the tasks as lm-evaluation-harness configs + JSONL data into DIR and exit")
    p.add_argument("--out", metavar="FILE.json", help="results JSON (a .png plot and, with --log-samples, "
                   "a .samples.jsonl.gz file are written beside it)")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (questions, records; "
                   "MMLU: N questions round-robin over subjects)")
    p.add_argument("--half", type=int, default=None, choices=[1, 2],
                   help="only the first (1) or second (2) half of each task's items, before --limit: choose "
                   "settings on one half, report on the other")
    p.add_argument("--positions", default=None, help=POSITION_HELP)
    p.add_argument("--data-dir", default=None, help="evaluation data folder (default: $PEAR_DATA)")
    p.add_argument("--seed", type=int, default=0, help="distractor tie-breaks, generated KV data, bootstrap")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (multi-GPU)")
    p.add_argument("--batch-size", type=_auto_or_int, default="auto",
                   help="max rows per batch, or auto (default: 8 on CPU, 512 on a GPU)")
    p.add_argument("--max-batch-tokens", type=_auto_or_int, default="auto",
                   help="max rows x (longest prompt + new tokens) per batch, or auto (default: 32768 on CPU; "
                        "on a GPU from its free memory and the variant's memory per token, at most 1.5M); a batch that runs "
                        "out of memory is split")
    p.add_argument("--decode", default="eager", choices=["eager", "static", "continuous", "continuous-static"],
                   help="greedy decoding: eager (default); static: a preallocated KV cache and the decoding "
                        "step compiled into CUDA graphs (faster on a GPU; the first batch compiles it); "
                        "continuous: rows that finish make room for waiting prompts (fewer steps with few "
                        "rows); continuous-static: both, continuous batching over the row slots of one static "
                        "cache, its step compiled once; static and continuous-static take plain models, continuous "
                        "plain models and moice, another --variant decodes eagerly")
    p.add_argument("--prefill", default="padded",
                   choices=["padded", "packed", "compiled", "packed-shared", "compiled-shared"],
                   help="how the prompts of a batch are read: padded (default: left-padded, with a padding mask); "
                        "packed: in one row without padding, variable-length attention (FlashAttention's varlen "
                        "kernel on CUDA); compiled: packed, with the decoder blocks compiled by torch.compile for "
                        "the prompts (the first batch compiles them); packed-shared, compiled-shared: the same, a "
                        "prefix that prompts read together share computed once (mdqa's gold positions); all but "
                        "padded with --decode eager, continuous or continuous-static, for plain transformers models "
                        "with full attention in every layer")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override every generation task's budget (default per task: 100, kv 128)")
    p.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                   help="chat template on generation tasks: auto = when the tokenizer has one (default)")
    p.add_argument("--distractor-pool", default="nq",
                   help="mdqa distractors: nq (default), nq+squad, nq+squad+hotpotqa")
    p.add_argument("--bootstrap", type=int, default=10_000, help="paired bootstrap resamples (default 10000)")
    p.add_argument("--log-samples", action="store_true", help="save every prompt, output and score")
    p.add_argument("--resume", action="store_true",
                   help="keep each (model, task) result in OUT.parts/ and reuse those of an identical earlier run")
    p.add_argument("--parts-dir", default=None, metavar="DIR",
                   help="like --resume, with the parts in DIR (share DIR between runs to assemble them)")
    p.add_argument("--parts", default="reuse", choices=["reuse", "only"],
                   help="with --parts-dir: reuse (default: compute what is missing), only (compute nothing: "
                        "assemble what the folder holds, leaving out a model whose task has a missing part)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (implied by --resume, --parts-dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_eval, models=None, variant=None, label=None, options=None)


def _command(args: argparse.Namespace, models: list[dict], tasks: list[str]) -> str:
    """The run as one explicit command line (every setting spelled out), for the results file."""
    parts = ["pear", "eval"]
    for m in models:
        parts += ["--model", m["spec"]] + (["--variant", m["variant"]] if m["variant"] not in (None, "none") else []) \
            + [x for k, v in m.get("options", {}).items() for x in ("--variant-option", f"{k}={_render(v)}")] \
            + (["--label", m["label"]] if m["label"] else [])
    parts += ["--task", ",".join(tasks)]
    for opt in ("limit", "half", "positions", "data_dir", "seed", "dtype", "device", "device_map", "batch_size",
                "max_batch_tokens", "max_new_tokens", "decode", "prefill", "chat", "distractor_pool", "bootstrap", "parts_dir",
                "parts", "out"):
        v = getattr(args, opt)
        if v is not None and (opt, v) not in (("parts", "reuse"), ("decode", "eager"), ("prefill", "padded")):
            parts += ["--" + opt.replace("_", "-"), str(v)]
    parts += [f for f, on in (("--log-samples", args.log_samples), ("--resume", args.resume)) if on]
    return " ".join(shlex.quote(x) for x in parts)


def _render(v) -> str:
    import json

    return ",".join(map(_render, v)) if isinstance(v, list) else v if isinstance(v, str) else json.dumps(v)


def _cli_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import distributed
    from ..evaluate.registry import DESCRIPTIONS, _load_builtin, parse_positions
    from ..evaluate.report import format_table, save_results
    from ..evaluate.runner import ModelEntry, evaluate

    if args.list_tasks:
        _load_builtin()
        for name in sorted(DESCRIPTIONS):
            print(f"{name:<12} {DESCRIPTIONS[name]}")
        return 0
    if not args.task:
        raise PearError("no --task given (pear eval --list-tasks shows them)")
    tasks = [t.strip() for spec in args.task for t in spec.split(",") if t.strip()]
    if args.export_lm_eval:
        from ..evaluate.data import resolve_data_dir
        from ..evaluate.lm_eval_export import export
        from ..evaluate.registry import BuildContext

        ctx = BuildContext(resolve_data_dir(args.data_dir), limit=args.limit, half=args.half,
                           positions=parse_positions(args.positions),
                           seed=args.seed, options={"distractor_pool": args.distractor_pool})
        names = export(tasks, args.export_lm_eval, ctx)
        print(f"wrote {len(names)} lm-eval tasks (tag: pear) to {args.export_lm_eval}: {', '.join(names)}")
        return 0
    if not args.out:
        raise PearError("no --out FILE.json given")
    models = args.models or [{"spec": "smollm2-135m", "variant": "none", "label": None, "options": {}}]
    entries = [ModelEntry(m["spec"], m["variant"] or "none", m["label"], m["options"]) for m in models]
    from ..hardware import announce
    from ..loading import resolve_spec
    from ..preflight import check_out_file

    # a results file is re-assembled from its parts by running the same command again
    from ..evaluate.registry import TASKS, split_task_name

    _load_builtin()
    unknown = [t for t in tasks if split_task_name(t)[0] not in TASKS]
    if unknown:
        raise PearError(f"unknown task '{unknown[0]}'; available: {', '.join(sorted(TASKS))} "
                        "(pear eval --list-tasks describes them)")
    if args.limit is not None and args.limit < 1:
        raise PearError(f"--limit must be >= 1, got {args.limit}")
    from ..baselines import get_variant

    for e in entries:  # every model before the first is loaded: a typo in the last costs nothing
        resolve_spec(e.spec)
        get_variant(e.variant).check_options(e.options)
    replace_ok = args.force or args.resume or args.parts_dir is not None
    out = check_out_file(args.out, replace_ok, also=(".png", ".md"), example="results.json")
    if args.parts_dir:
        check_out_file(Path(args.parts_dir) / "x", True, suffix=None)
    dtype = announce(args.device, args.dtype).dtype
    results = evaluate(
        entries, tasks, data_dir=args.data_dir, limit=args.limit, half=args.half,
        positions=parse_positions(args.positions),
        seed=args.seed, dtype=dtype, device=args.device, device_map=args.device_map, batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens, chat=args.chat, distractor_pool=args.distractor_pool,
        n_resamples=args.bootstrap, log_samples=args.log_samples, progress=not args.no_progress,
        parts_dir=args.parts_dir or (out.with_name(out.stem + ".parts") if args.resume else None), parts=args.parts,
        max_new_tokens=args.max_new_tokens, command=_command(args, models, tasks), decode=args.decode,
        prefill=args.prefill)
    if not distributed.is_main():  # data-parallel: every process has the results, rank 0 writes them
        return 0
    left = ", ".join(f"{m['label']}/{m['task']}" for m in results.get("missing", []))
    written = save_results(results, out)
    print(format_table(results))
    if left:
        print(f"left out (a part is missing): {left}")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
