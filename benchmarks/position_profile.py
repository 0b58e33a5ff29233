"""How well a model reads the gold passage at each position: log-likelihood of the gold answer.

    python3 benchmarks/position_profile.py --model smollm2-135m --task mdqa-20 --half 1 --limit 30 \
        --coefficients paper=benchmarks/results/recipe_study_round2/runs/smollm2-135m/paper/coefficients.json \
        --out benchmarks/results/position_profile/smollm2-135m.json

Accuracy per gold position is a coarse signal: 30 questions per position move it by ±8 points,
so a recipe's effect on the position gap cannot be seen below a few hundred questions. The
log-probability of the gold answer, teacher forced after the prompt as the evaluation renders it
(chat template, `objectives.retrieval.encode`), is continuous and paired: the same examples under
the base model and under each set of coefficients (applied with hooks, `HeadScaling`, which
equals the folded model) or each inference-time variant (`--variant LABEL=NAME` with its
`--variant-option`s, as `pear eval` takes them). Printed and saved per gold position: the mean log-probability per
answer token of each model, and each recipe's paired difference to the base with a bootstrap
95 % interval; the gap is the best position's mean minus the worst's. It says whether a recipe
lifts the middle more than the ends (what cutting the gap needs) or every position alike.

The bare gold span right after the prompt is not what a chat model answers ("The first Nobel
Prize in Physics was awarded to ..."), so a recipe that keeps the model's own form may lose on it
where it reads as well as before. `--targets PARTS` (a `pear eval` part of the base model on the
same examples) scores instead the base model's own first line where it was right, and only those
examples: whether a recipe keeps the answers the base read correctly, in their own words.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="folder, .gguf file or preset")
    ap.add_argument("--coefficients", action="append", default=[], metavar="LABEL=FILE",
                    help="a coefficients.json to compare with the base model (repeatable)")
    ap.add_argument("--variant", dest="variants", action=_VariantAction, default=[], metavar="LABEL=NAME",
                    help="an inference-time variant (pear eval --variant) to compare with the base model (repeatable)")
    ap.add_argument("--variant-option", action=_VariantOptionAction, metavar="KEY=VALUE",
                    help="an option of the preceding --variant (as pear eval's)")
    ap.add_argument("--task", default="mdqa-20")
    ap.add_argument("--half", type=int, choices=[1, 2], default=1)
    ap.add_argument("--limit", type=int, default=30, help="first N questions (x the task's gold positions)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    ap.add_argument("--targets", default=None, metavar="PARTS.json.gz",
                    help="score the base model's own right answers (its first lines) from this `pear eval` part, "
                         "instead of the gold span")
    ap.add_argument("--out", required=True, metavar="FILE.json")
    args = ap.parse_args(argv)

    from pear.atomic import json_text, write_text
    from pear.errors import PearError
    from pear.evaluate.data import resolve_data_dir
    from pear.evaluate.registry import BuildContext, build_task
    from pear.folding import read_coefficients, read_site
    from pear.loading import load_model
    from pear.provenance import provenance

    from pear.baselines import get_variant

    variants = {}  # label: a context manager factory, loaded -> the model to score

    def add(flag: str, label: str, applied) -> None:
        if label == "base" or label in variants:
            raise PearError(f"{flag}: label '{label}' is taken")
        variants[label] = applied

    for item in args.coefficients:
        label, path = split_label(item)
        add("--coefficients", label,
            lambda lm, c=read_coefficients(path), site=read_site(path): _scaled(lm.model, c, site))
    for v in args.variants:
        variant = get_variant(v["name"])
        variant.check_options(v["options"])
        add("--variant", v["label"], lambda lm, var=variant, o=v["options"]: var.wrap(lm, **o))
    task = build_task(args.task, BuildContext(resolve_data_dir(args.data_dir), limit=args.limit, half=args.half))
    if not task.positional:
        raise PearError(f"{args.task} has no gold positions; use a multi-document task (mdqa-10, mdqa-20)")
    examples = (own_answers(task.examples, args.targets) if args.targets
                else [(ex, ex.answers[0]) for ex in task.examples])
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    seqs = [answer_sequence(loaded.tokenizer, ex.prompt, answer) for ex, answer in examples]
    positions = [ex.condition for ex, _ in examples]

    scores = {"base": answer_logprob(loaded.model, seqs, args.micro_batch, "base")}
    for label, applied in variants.items():
        with applied(loaded) as m:  # the model, or a variant's callable that passes through to it
            scores[label] = answer_logprob(m, seqs, args.micro_batch, label)
    res = {"command": "python3 benchmarks/position_profile.py " + shlex.join(argv), "task": args.task,
           "half": args.half, "examples": len(seqs), "target": "own answers" if args.targets else "gold span",
           "n_by_position": {p: positions.count(p) for p in sorted(set(positions), key=int)},
           "profile": profile(scores, positions),
           "per_example": {"ids": [ex.id for ex, _ in examples], "positions": positions,
                           **{k: [round(v, 5) for v in s] for k, s in scores.items()}},
           **provenance(str(loaded.model.device))}
    print(table(res["profile"]))
    print("examples per gold position:", res["n_by_position"])
    write_text(args.out, json_text(res) + "\n")
    return 0


@contextlib.contextmanager
def _scaled(model, coefficients, site: str = "output"):
    from pear.folding import HeadScaling

    with HeadScaling(model, coefficients, trainable=False, site=site):  # where the file's scales act
        yield model


class _VariantAction(argparse.Action):
    """--variant LABEL=NAME: a variant to score, to which the following --variant-option apply."""

    def __call__(self, parser, ns, value, option_string=None):
        label, sep, name = value.rpartition("=")
        if not sep or not label or not name:
            parser.error(f"--variant expects LABEL=NAME, got '{value}'")
        ns.variants = [*getattr(ns, "variants", []), {"label": label, "name": name, "options": {}}]


class _VariantOptionAction(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        from pear.commands.eval import parse_option

        if not getattr(ns, "variants", None):
            parser.error("--variant-option must follow the --variant it applies to")
        key, val = parse_option(value)
        ns.variants[-1]["options"][key] = val


def split_label(item: str) -> tuple[str, str]:
    """LABEL=FILE -> (LABEL, FILE), at the first '=' after which an existing file is named: the
    study's labels hold '=' themselves ("retrieval-channels@anchor=10"), and so do its folders."""
    from pathlib import Path

    from pear.errors import PearError

    for i, ch in enumerate(item):
        if ch == "=" and i and Path(item[i + 1:]).is_file():
            return item[:i], item[i + 1:]
    raise PearError(f"--coefficients expects LABEL=FILE with FILE an existing coefficients.json, got '{item}'")


def own_answers(examples: list, parts_file: str) -> list:
    """(example, the base model's first line) for each example the part scored right; the part must
    hold every example (same task, half and limit), matched on id and gold position."""
    from pear.errors import PearError
    from pear.evaluate.cache import read_part
    from pear.evaluate.metrics import first_line

    try:
        records = {(r["id"], str(r["condition"])): r for r in read_part(parts_file)["records"]}
    except (OSError, ValueError, KeyError) as e:
        raise PearError(f"--targets: cannot read a `pear eval` part from {parts_file} ({e})") from None
    missing = [ex.id for ex in examples if (ex.id, str(ex.condition)) not in records]
    if missing:
        raise PearError(f"--targets: {parts_file} lacks {len(missing)} of the examples (first: {missing[0]}); "
                        "use a part of the same task, half and limit")
    answers = [(ex, records[(ex.id, str(ex.condition))]) for ex in examples]
    out = [(ex, first_line(r["output"])) for ex, r in answers if r["score"] > 0]
    out = [(ex, line) for ex, line in out if line]
    if not out:
        raise PearError(f"--targets: no example of {parts_file} was answered right")
    return out


def answer_sequence(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """(prompt + answer token ids, answer length), the prompt rendered as the evaluation renders it."""
    from pear.objectives.retrieval import encode

    p, a = encode(tokenizer, prompt, answer)
    return p + a, len(a)


@torch.no_grad()
def answer_logprob(model, seqs: list[tuple[list[int], int]], micro_batch: int, label: str = "") -> list[float]:
    """Mean log-probability per answer token of each sequence (teacher forced); a progress bar
    named `label` on stderr (a CPU run takes minutes per variant)."""
    from tqdm.auto import tqdm

    from pear.objectives import sequence_nll

    out = []
    for i in tqdm(range(0, len(seqs), micro_batch), desc=label or "scoring", unit="batch", leave=False):
        chunk = seqs[i:i + micro_batch]
        out += (-sequence_nll(model, [s for s, _ in chunk], [n for _, n in chunk])).tolist()
    return out


def profile(scores: dict[str, list[float]], positions: list[str]) -> dict:
    """Per model: mean per gold position and the gap; per recipe: the paired difference to base."""
    from pear.evaluate.stats import paired_bootstrap

    order = sorted(set(positions), key=int)
    at = {p: np.array([i for i, q in enumerate(positions) if q == p]) for p in order}
    b = np.asarray(scores["base"])
    out = {}
    for label, s in scores.items():
        s = np.asarray(s)
        means = {p: float(s[idx].mean()) for p, idx in at.items()}
        row = {"mean": float(s.mean()), "by_position": means, "gap": max(means.values()) - min(means.values())}
        if label != "base":
            row["vs_base"] = {"all": paired_bootstrap(b, s),
                              **{p: paired_bootstrap(b[idx], s[idx]) for p, idx in at.items()}}
        out[label] = row
    return out


def table(prof: dict) -> str:
    pos = list(next(iter(prof.values()))["by_position"])
    lines = ["| model | mean | " + " | ".join(f"gold {p}" for p in pos) + " | gap |",
             "|---|---:|" + "---:|" * len(pos) + "---:|"]
    for label, r in prof.items():
        cells = [f"{r['by_position'][p]:.3f}" + (f" ({r['vs_base'][p]['diff']:+.3f})" if "vs_base" in r else "")
                 for p in pos]
        lines.append(f"| {label} | {r['mean']:.3f} | " + " | ".join(cells) + f" | {r['gap']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from pear.errors import PearError

    try:
        raise SystemExit(main())
    except PearError as e:  # bad input (model, data folder, task, coefficients, targets): one line, nothing written
        print(f"position_profile: error: {e}", file=sys.stderr)
        raise SystemExit(2)
