"""The recipe study: which recipe should `pear run` use by default? (BENCHMARKS.md §5)

    python3 benchmarks/recipe_study.py --work DIR [--models a,b,...] [--stage all|fit|screen|select|final]

Protocol (written down before it ran, BENCHMARKS.md §5): every candidate recipe of
`pear.recipes` is fitted on every screened model (seed 0); the candidates are screened on the
*first* half of the multi-document QA questions (mdqa-20, the first SCREEN_Q questions of half 1,
gold at documents 1, 6, 10, 15, 20); a rule of RULES chooses one recipe (or, `per-model`, one
per model) from those figures alone; the chosen recipe is fitted again with seed 1, and base,
paper, chosen (seed 0) and chosen (seed 1) are evaluated on the *second* half (mdqa-20, kv,
closed-book, MMLU) of every report model. Nothing measured on the second half takes part in the choice.

A candidate is a recipe name, or a recipe with fit options changed (``paper@lr=0.02,steps=80``,
fitted as ``pear run --recipe paper --lr 0.02 --steps 80``); ``--guard mmlu=2000`` screens every
candidate on a second task too, and the per-model rule keeps only those that lose at most half a
point there.

Each step is a `pear` command (printed and logged), so every figure can be reproduced one
command at a time; finished outputs are kept and skipped when the study is run again.
`--jobs` commands run at once (one GPU holds several small models).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pear.errors import PearError  # noqa: E402
from pear.evaluate.cache import read_part  # noqa: E402
from pear.recipes import NAME_KEYS, OPTION_OVERRIDES, RECIPES, split_name, value_text  # noqa: E402

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
SCREEN_MODELS = MODELS[:3]  # the largest model enters on the report half only
SCREEN_TASK, SCREEN_Q = "mdqa-20", 100
GOAL_DELTA, GOAL_GAP = 0.03, 2 / 3  # the goal on a screened model: Δ ≥ +3 points, gap ≤ 2/3 of base's
RULES = {  # name: (text, sort key over a candidate's screen score; the largest wins)
    "goal": ("most screened models meeting Δ ≥ +3 points and gap ≤ 2/3 of base (mdqa-20, half 1); "
             "ties: larger mean Δ, then smaller mean gap",
             lambda s: (s["meets_goal"], s["mean_delta"], -s["mean_gap"])),
    "mean": ("largest mean Δ accuracy over the models on mdqa-20 half 1 (ties: smaller mean gap)",
             lambda s: (s["mean_delta"], -s["mean_gap"])),
    "per-model": ("per model: the candidate with the largest Δ on mdqa-20 half 1 if that Δ is ≥ +3 points, "
                  "else paper (with --guard: among the candidates that lose at most half a point on the guard "
                  "task); a model not screened takes the choice of its screened sibling (SIBLINGS)", None),
    "per-model-gap": ("per model: among the candidates that per-model allows (Δ ≥ +3 points on mdqa-20 half 1, "
                      "--guard, --length-words), the one with the smallest position gap on half 1 (ties: larger Δ), "
                      "else paper; every allowed candidate already meets the average, so the gap decides", None),
}
SIBLINGS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}  # same family, tokenizer and training data
GUARD_MIN = -0.005  # --guard: a candidate may lose at most half a point on the guard task (half 1)
FINAL_TASKS = [("mdqa-20", 300), ("kv", 100), ("closedbook", None), ("mmlu", None)]  # (task, questions of half 2)


def candidate(name: str) -> tuple[str, list[str]]:
    """A candidate's recipe and its `pear run` options: "paper" -> ("paper", []);
    "paper@lr=0.02,steps=80" -> ("paper", ["--lr", "0.02", "--steps", "80"]); a change of the
    objective's options stays in the recipe's name, which `--recipe` reads ("--objective-option"
    would replace all of the recipe's): "R@hold=0.5,steps=10" -> ("R@hold=0.5", ["--steps", "10"])."""
    try:
        recipe, overrides = split_name(name)
    except PearError as e:
        raise ValueError(f"candidate {name!r}: {e}") from None
    args, options = [], []
    for key, value in overrides.items():
        if key in OPTION_OVERRIDES:
            options.append(f"{key}={value_text(value)}")
        else:
            args += [f"--{key.replace('_', '-')}", value_text(value)]
    return recipe + ("@" + ",".join(options) if options else ""), args


def split_candidates(text: str) -> list[str]:
    """"paper,paper@lr=0.02,steps=80,retrieval" -> ["paper", "paper@lr=0.02,steps=80", "retrieval"]:
    a KEY=VALUE item belongs to the candidate before it."""
    out: list[str] = []
    for item in filter(None, text.split(",")):
        if "=" in item and "@" not in item and out and "@" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def pear(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "pear.cli"] + args
    line = "pear " + " ".join(shlex.quote(a) for a in args)
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {line}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        f.write(f"# rc {rc}, {time.time() - t:.0f} s\n")
    print(f"[{time.strftime('%H:%M:%S')}] rc {rc} {time.time() - t:6.0f} s  {line}", flush=True)
    if rc:
        raise RuntimeError(f"failed ({rc}): {line}")


class Study:
    """The study as a set of `pear` commands run `--jobs` at a time: a fit and the evaluation of
    its model are one chain, so screening starts as soon as a fit is done. Every variant is
    evaluated alone into a shared parts folder (content-keyed), and one `pear eval --parts only`
    per model and task then assembles the table, with its paired statistics, from those parts."""

    def __init__(self, a):
        self.work, self.a = Path(a.work), a
        self.common = ["--device", a.device, "--dtype", "bf16"]
        self.eval_common = self.common + ["--seed", "0", "--no-progress", "--batch-size", str(a.batch_size),
                                          "--max-batch-tokens", str(a.max_batch_tokens),
                                          "--parts-dir", str(self.work / "parts")]

    def spec(self, model: str) -> str:
        return self.a.model_file.format(model=model) if self.a.model_file else model

    def run_dir(self, model: str, recipe: str, seed: int = 0) -> Path:
        return self.work / "runs" / model / (recipe if seed == 0 else f"{recipe}-seed{seed}")

    def fit(self, model: str, name: str, seed: int = 0) -> str:
        out = self.run_dir(model, name, seed)
        if not (out / "model").is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            recipe, options = candidate(name)
            pear(["run", "--model", self.spec(model), "--recipe", recipe, *options, "--seed", str(seed), "--out", str(out),
                  "--save-dtype", "bf16", "--no-progress", "--force"] + self.common + self.a.run_args,
                 self.log(model, f"fit-{name}-{seed}"))
        return str(out / "model")

    def label_spec(self, model: str, label: str) -> str:
        """The model a variant label names: the base, RECIPE (seed 0) or RECIPE-seedN."""
        if label == "base":
            return self.spec(model)
        recipe, _, seed = label.partition("-seed")
        return str(self.run_dir(model, recipe, int(seed or 0)) / "model")

    def log(self, model: str, what: str, create: bool = True) -> Path:
        if create:
            (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self.work / "logs" / f"{model}-{what}.log"

    def evaluate(self, model: str, variants: list[tuple[str, str]], task: str, half: int, limit, out: Path,
                 only: bool = False):
        if out.is_file():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["eval"]
        for label, spec in variants:
            args += ["--model", spec, "--label", label]
        args += ["--task", task, "--half", str(half), "--out", str(out)] + self.eval_common
        if limit:
            args += ["--limit", str(limit)]
        if only:
            args += ["--parts", "only"]
        pear(args, self.log(model, f"eval-{task}-h{half}-{variants[0][0] if len(variants) == 1 else 'all'}"))

    def make(self, model: str, label: str) -> str:
        """The variant's model, fitted first where it is not there yet."""
        if label == "base":
            return self.spec(model)
        recipe, _, seed = label.partition("-seed")
        return self.fit(model, recipe, int(seed or 0))

    def chain(self, model: str, label: str, tasks: list[tuple[str, int, int | None]]):
        """One job: make the variant's model (a fit, or nothing for the base), then evaluate it alone."""
        outs = [(task, half, limit, self.work / "single" / model / f"{task}-h{half}-{label}.json")
                for task, half, limit in tasks]
        if outs and all(out.is_file() for *_, out in outs):
            return  # evaluated before: no need for its model
        spec = self.make(model, label)
        for task, half, limit, out in outs:
            self.evaluate(model, [(label, spec)], task, half, limit, out)

    def run_chains(self, chains: list[tuple]):
        def go(c):
            try:
                self.chain(*c)
            except Exception as e:  # one failure must not stop the others
                print(f"{c[0]} {c[1]}: {e}", flush=True)

        with ThreadPoolExecutor(self.a.jobs) as pool:
            list(pool.map(go, chains))

    # ------------------------------------------------------------------ stages
    def labels_final(self, chosen: str) -> list[str]:
        return ["base", "paper"] + ([chosen] if chosen != "paper" else []) + [f"{chosen}-seed1"]

    def stage_fit(self):
        self.run_chains([(m, r, []) for m in self.a.screen_models for r in self.a.recipes])

    def stage_screen(self):
        labels = ["base"] + self.a.recipes
        self.run_chains([(m, lab, [(SCREEN_TASK, 1, self.a.screen_q)]) for m in self.a.screen_models for lab in labels])
        if self.a.guard:  # the guard task where it can change the choice: the base and candidates at >= +3
            guard = [(self.a.guard[0], 1, self.a.guard[1])]
            self.run_chains([(m, lab, guard) for m in self.a.screen_models for lab in ["base"] + self.eligible(m)])
        for m in self.a.screen_models:
            variants = [(lab, self.label_spec(m, lab)) for lab in labels]
            self.assemble(m, variants, SCREEN_TASK, 1, self.a.screen_q, self.work / "screen" / f"{m}.json")

    def assemble(self, model, variants, task, half, limit, out):
        try:
            self.evaluate(model, variants, task, half, limit, out, only=True)
        except Exception as e:
            print(f"{model} {task}: {e}", flush=True)

    def stage_select(self) -> str | dict[str, str]:
        table = {}  # from each variant's own screen file: the choice needs accuracies and gaps only
        for m in self.a.screen_models:
            for lab in ["base"] + self.a.recipes:
                v = _single(self.work, m, SCREEN_TASK, 1, lab)
                if v is not None:
                    table.setdefault(m, {})[lab] = {"all": v["all"]["accuracy"], "gap": _gap(v)}
        table = {m: t for m, t in table.items() if "base" in t}
        if not table:
            raise RuntimeError("no screening results")
        if self.a.rule in ("per-model", "per-model-gap"):
            return self.select_per_model(table)
        score = {}
        for r in self.a.recipes:
            rows = [t for t in table.values() if r in t]
            if len(rows) < len(table):
                continue
            deltas = [t[r]["all"] - t["base"]["all"] for t in rows]
            gaps = [t[r]["gap"] for t in rows]
            goal = sum(t[r]["all"] - t["base"]["all"] >= GOAL_DELTA and t[r]["gap"] <= GOAL_GAP * t["base"]["gap"]
                       for t in rows)
            score[r] = {"meets_goal": goal, "mean_delta": sum(deltas) / len(deltas), "mean_gap": sum(gaps) / len(gaps)}
        key = RULES[self.a.rule][1]
        chosen = max(score, key=lambda r: key(score[r]))
        sel = {"rule": RULES[self.a.rule][0], "models": list(table), "screen": table, "score": score,
               "chosen": chosen}
        (self.work / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
        print(json.dumps(score, indent=1), "\nchosen:", chosen, flush=True)
        return chosen

    def refused(self, model: str, recipe: str) -> str | None:
        """Why a candidate has no model to screen, where its fit's fold check refused to save one
        (`pear run` saves nothing it cannot fold exactly): such a candidate cannot be chosen."""
        log = self.log(model, f"fit-{recipe}-0", create=False)
        lines = [x for x in log.read_text().splitlines() if "fold verification failed" in x] if log.is_file() else []
        return lines[-1].removeprefix("pear: error: ") if lines else None

    def eligible(self, model: str) -> list[str]:
        """The candidates the per-model rule could choose: those with Δ >= +3 points on the screen
        (a candidate below can never be chosen, so its guard value is not needed)."""
        base = _single(self.work, model, SCREEN_TASK, 1, "base")
        out = []
        for r in self.a.recipes:
            v = _single(self.work, model, SCREEN_TASK, 1, r)
            if base is not None and v is not None and \
                    v["all"]["accuracy"] - base["all"]["accuracy"] >= GOAL_DELTA - 1e-9:
                out.append(r)
        return out

    def guard_deltas(self, model: str, eligible: list[str]) -> dict[str, float]:
        """--guard: each eligible candidate's accuracy minus the base's on the guard task (half 1)."""
        task, _ = self.a.guard
        acc = {}
        for lab in ["base"] + eligible:
            v = _single(self.work, model, task, 1, lab)
            if v is None:
                raise RuntimeError(f"{model}: guard {task} missing for {lab}")
            acc[lab] = v["all"]["accuracy"]
        return {r: acc[r] - acc["base"] for r in acc if r != "base"}

    def cut_rows(self, models: list[str]) -> dict[str, dict]:
        """--length-words: the screen rescored with answers cut to N words (`answer_length.py`),
        from the screen's parts, for every model at once (one length_check_h1.json)."""
        from answer_length import length_check

        from pear.evaluate.data import resolve_data_dir

        return length_check(self.work, models, resolve_data_dir(None), half=1, questions=self.a.screen_q)

    def cut_deltas(self, model: str, eligible: list[str], rows: dict) -> dict[str, float]:
        """Each eligible candidate's screen Δ with answers cut to N words."""
        missing = [r for r in eligible if r not in rows.get(model, {})]
        if missing:
            raise RuntimeError(f"{model}: length check missing for {', '.join(missing)}")
        return {r: rows[model][r]["by_words"][str(self.a.length_words)]["diff"] for r in eligible}

    def select_per_model(self, table: dict) -> dict[str, str]:
        """The per-model rule: every model needs its whole screen (no choice from part of it);
        with --guard, a candidate that loses more than half a point on the guard task is out (the
        guard is measured only for candidates at >= +3 points: the others cannot be chosen)."""
        chosen, deltas, guards, cut, refused = {}, {}, {}, {}, {}
        for m, t in table.items():
            missing = [r for r in self.a.recipes if r not in t]
            refused[m] = {r: why for r in missing if (why := self.refused(m, r))}
            missing = [r for r in missing if r not in refused[m]]
            if missing:
                raise RuntimeError(f"{m}: screen incomplete, missing {', '.join(missing)}")
        rows = self.cut_rows(list(table)) if self.a.length_words else {}
        for m, t in table.items():
            deltas[m] = {r: t[r]["all"] - t["base"]["all"] for r in self.a.recipes if r not in refused[m]}
            allowed = self.eligible(m)  # only these can be chosen
            if self.a.guard:
                guards[m] = self.guard_deltas(m, allowed)
                allowed = [r for r in allowed if guards[m][r] >= GUARD_MIN - 1e-9]
            if self.a.length_words:  # the gain must hold with answers cut to N words (not longer answers)
                cut[m] = self.cut_deltas(m, allowed, rows)
                allowed = [r for r in allowed if cut[m][r] >= GOAL_DELTA - 1e-9]
            best = ((lambda r: (-round(t[r]["gap"], 6), deltas[m][r])) if self.a.rule == "per-model-gap"
                    else (lambda r: (deltas[m][r], -t[r]["gap"])))
            chosen[m] = max(allowed, key=best, default="paper")  # all at >= +3
        for m in self.a.models:
            if m not in chosen and SIBLINGS.get(m) in chosen:
                chosen[m] = chosen[SIBLINGS[m]]
        sel = {"rule": RULES[self.a.rule][0], "models": list(table), "screen": table, "delta": deltas,
               "chosen": chosen, **({"guard": {"task": self.a.guard[0], "delta": guards}} if self.a.guard else {}),
               **({"length": {"words": self.a.length_words, "delta": cut}} if self.a.length_words else {}),
               **({"refused": {m: r for m, r in refused.items() if r}} if any(refused.values()) else {})}
        (self.work / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
        print("chosen:", json.dumps(chosen), flush=True)
        return chosen

    def stage_final(self, chosen: str | dict[str, str]):
        tasks = [(t, 2, lim) for t, lim in self.a.final_tasks]
        per_model = chosen if isinstance(chosen, dict) else {m: chosen for m in self.a.models}
        missing = [m for m in self.a.models if m not in per_model]
        if missing:
            raise RuntimeError(f"no recipe chosen for {', '.join(missing)}")
        self.run_chains([(m, lab, tasks) for m in self.a.models for lab in self.labels_final(per_model[m])])
        for m in self.a.models:
            labels = self.labels_final(per_model[m])
            variants = [(lab, self.label_spec(m, lab)) for lab in labels]
            for t, _, lim in tasks:
                self.assemble(m, variants, t, 2, lim, self.work / "final" / f"{m}-{t}.json")


def _single(work: Path, model: str, task: str, half: int, label: str) -> dict | None:
    """A variant's own evaluation (`single/MODEL/TASK-hHALF-LABEL.json`): its accuracies by condition."""
    f = work / "single" / model / f"{task}-h{half}-{label}.json"
    return json.loads(f.read_text())["tasks"][task]["models"][label] if f.is_file() else None


def _model_of(spec: str, models: list[str]) -> str | None:
    for m in models:  # the base is the model's file or preset; a variant is runs/MODEL/RECIPE/model
        if spec in (m, f"{m}.gguf") or spec.endswith(f"/{m}.gguf") or f"/runs/{m}/" in spec:
            return m
    return None


def _records(work: Path, task: str, models: list[str], size_ok, examples: set | None = None) -> dict[str, dict[str, list]]:
    """{model: {label: records}}: each variant's whole evaluation of `task` whose size passes
    `size_ok`, joined from its parts (`pear eval --parts-dir` saves a long one in several).
    Parts are joined by label, not by path: an evaluation resumed in another folder reuses the
    parts whose content key (the model's weights, the examples, the settings) matches, so one
    evaluation's parts can name two paths of the same model. Two different parts at one start
    are an error. `examples`, the (id, condition) pairs wanted: a part of other examples (the
    other half, evaluated at the same size) is not read."""
    chunks: dict[tuple, dict[int, list]] = {}
    for f in sorted((work / "parts").glob(f"*__{task}__*.json.gz")):
        d = read_part(f)
        m = _model_of(d["spec"], models)
        if examples is not None and any((r["id"], r["condition"]) not in examples for r in d["records"]):
            continue
        if m and size_ok(d["of"]):
            at = chunks.setdefault((m, d["label"], d["of"]), {})
            if d["start"] in at and at[d["start"]] != d["records"]:
                raise RuntimeError(f"{m} {d['label']} {task}: two different parts at example {d['start']}")
            at[d["start"]] = d["records"]
    out: dict[str, dict[str, list]] = {}
    for (m, label, of), parts in sorted(chunks.items()):
        recs = [r for s in sorted(parts) for r in parts[s]]
        if len(recs) != of:
            continue  # a part is missing: left out, not half-counted
        if label in out.get(m, {}):
            raise RuntimeError(f"{m} {label} {task}: two evaluations of that size")
        out.setdefault(m, {})[label] = recs
    return out


def _paired(by_label: dict[str, list], what: str) -> dict:
    """Every variant against the base on the same examples, summarised as `pear eval` does
    (`pear.evaluate.summary`): accuracy, Δ with its paired bootstrap interval, exact McNemar p,
    accuracy per condition (gold position) and the best-minus-worst gap."""
    from types import SimpleNamespace

    from pear.evaluate.summary import summarise

    conds = list(dict.fromkeys(r["condition"] for r in by_label["base"]))
    task = SimpleNamespace(conditions=conds, metric=None, kind=None, positional=conds != ["all"], info={}, examples=[])
    labels = ["base"] + sorted(lab for lab in by_label if lab != "base")
    summary = summarise(task, labels, by_label, n_resamples=10_000, seed=0)
    base, out = summary["models"]["base"], {}
    for lab in labels[1:]:
        v, cmp = summary["models"][lab], summary["paired"][lab]["conditions"]["all"]
        if cmp["n"] != len(by_label["base"]):
            raise RuntimeError(f"{what} {lab}: not the base's examples")
        row = {"acc": v["all"]["accuracy"], "diff": cmp["diff"], "ci95": cmp["ci95"], "p_mcnemar": cmp["p_mcnemar"]}
        if task.positional:
            row.update(gap=_gap(v), base_gap=_gap(base), per_position={c: v[c]["accuracy"] for c in conds},
                       base_per_position={c: base[c]["accuracy"] for c in conds})
        else:
            row["base_acc"] = base["all"]["accuracy"]
        out[lab] = {**row, "n": cmp["n"]}
    return out


def half_examples(data_dir, task: str, limit: int | None, half: int) -> set:
    """The (id, condition) pairs of `task`'s first `limit` items of `half`: what tells the two
    halves' parts apart when both were evaluated at the same size (MMLU: 7,021 items each)."""
    from pear.evaluate.registry import BuildContext, build_task

    return {(e.id, e.condition) for e in build_task(task, BuildContext(Path(data_dir), limit=limit, half=half)).examples}


def screen_paired(work: Path, models: list[str], screen_q: int = SCREEN_Q,
                  positions=("1", "6", "10", "15", "20"), data_dir=None) -> dict:
    """Every screened variant against its model's base on the same examples, from the per-example
    parts of the screen (`work/parts`); needs no model, so it runs anywhere the parts are (with
    `data_dir`, only parts of half 1's screen questions are read). Writes screen_paired.json."""
    examples = half_examples(data_dir, SCREEN_TASK, screen_q, 1) if data_dir else None
    recs = _records(work, SCREEN_TASK, models, lambda of: of == screen_q * len(positions), examples)
    out = {f"{m}/{lab}": row for m, by_label in sorted(recs.items()) if "base" in by_label
           for lab, row in _paired(by_label, m).items()}
    (work / "screen_paired.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def report_paired(work: Path, models: list[str], tasks: list[tuple[str, int | None]], data_dir=None) -> dict:
    """The same for the report half (half 2): for each model and task, the variants whose
    single evaluation (`single/MODEL/TASK-h2-LABEL.json`) is there, from their parts (with
    `data_dir`, only parts of half 2's items: half 1 may have been evaluated at the same size).
    Writes report_paired.json, {model: {task: {label: row}}}."""
    out: dict[str, dict] = {}
    examples = {task: half_examples(data_dir, task, limit, 2) for task, limit in tasks} if data_dir else {}
    for m in models:
        for task, _ in tasks:
            prefix = f"{task}-h2-"
            alls = [_single(work, m, task, 2, f.stem[len(prefix):])["all"]
                    for f in (work / "single" / m).glob(f"{prefix}*.json")]
            sizes = {a["n"] + a["skipped"] for a in alls}
            if len(sizes) != 1:
                continue  # nothing evaluated, or variants of different sizes
            by_label = _records(work, task, [m], lambda of: of in sizes, examples.get(task)).get(m, {})
            if "base" in by_label and len(by_label) > 1:
                out.setdefault(m, {})[task] = _paired(by_label, f"{m} {task}")
    (work / "report_paired.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _gap(v: dict) -> float:
    accs = [x["accuracy"] for c, x in v.items() if c != "all"]
    return max(accs) - min(accs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for runs, results and logs")
    p.add_argument("--models", default=",".join(MODELS), help="models of the report half (final stage)")
    p.add_argument("--screen-models", default=",".join(SCREEN_MODELS), help="models that choose (fit, screen)")
    p.add_argument("--rule", default="goal", choices=list(RULES), help="selection rule (round 1: mean)")
    p.add_argument("--model-file", default=None, help="model spec pattern, e.g. /data/{model}.gguf (default: presets)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="candidates: recipes of pear.recipes, or RECIPE@KEY=VALUE,... with KEY among "
                   + ", ".join(NAME_KEYS))
    p.add_argument("--length-words", type=int, default=None, metavar="N", choices=[10, 20],
                   help="the per-model rule also needs the Δ to reach +3 with answers cut to their first N words "
                        "(so that longer answers alone cannot win; benchmarks/answer_length.py)")
    p.add_argument("--guard", default=None, metavar="TASK=N",
                   help="also screen on the first N items of TASK (half 1); the per-model rule drops a candidate "
                        "that loses more than half a point there (e.g. mmlu=2000)")
    p.add_argument("--stage", default="all", choices=["all", "fit", "screen", "paired", "select", "final"],
                   help="fit and screen use --screen-models, final uses --models; paired: the paired statistics "
                        "of the screen and the report half from their parts (screen_paired.json, "
                        "report_paired.json), no model needed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", type=int, default=4, help="commands in parallel")
    p.add_argument("--screen-q", type=int, default=SCREEN_Q, help="questions of half 1 for screening")
    p.add_argument("--final-tasks", default=",".join(t for t, _ in FINAL_TASKS), help="tasks of the report half")
    p.add_argument("--final-limits", default=None, help="e.g. mdqa-20=300,kv=100 (questions of half 2)")
    p.add_argument("--run-args", default="", help="more `pear run` options for every fit (e.g. a quick smoke "
                   "test: '--steps 1 --batch 1 --eval-batch 1')")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=400_000)
    a = p.parse_args()
    a.models, a.recipes, a.run_args = a.models.split(","), split_candidates(a.recipes), shlex.split(a.run_args)
    a.screen_models = a.screen_models.split(",")
    try:
        for r in a.recipes:  # a bad option fails here, before any work
            if "@" in r:
                candidate(r)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.guard:
        task, _, n = a.guard.partition("=")
        a.guard = (task, int(n) if n else None)
    limits = dict(FINAL_TASKS)
    for kv in (a.final_limits.split(",") if a.final_limits else []):
        k, v = kv.split("=")
        limits[k] = None if v == "all" else int(v)
    a.final_tasks = [(t, limits[t]) for t in a.final_tasks.split(",")]
    st = Study(a)
    if a.stage == "fit":
        st.stage_fit()
    if a.stage in ("all", "screen"):
        st.stage_screen()
    if a.stage in ("all", "screen", "paired"):
        from pear.evaluate.data import resolve_data_dir

        data_dir = resolve_data_dir(None)  # $PEAR_DATA: which examples belong to which half
        screen_paired(st.work, a.screen_models, a.screen_q, data_dir=data_dir)
    if a.stage == "paired":
        report_paired(st.work, a.models, a.final_tasks, data_dir=data_dir)
    if a.stage in ("all", "select", "final"):
        chosen = st.stage_select()
        if a.stage != "select":
            st.stage_final(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
