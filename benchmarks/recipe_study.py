"""The recipe study: which recipe should `pear run` use by default? (BENCHMARKS.md §5)

    python3 benchmarks/recipe_study.py --work DIR [--models a,b,...] [--stage all|fit|screen|select|final]

Protocol (written down before it ran, BENCHMARKS.md §5): every candidate recipe of
`pear.recipes` is fitted on every model (seed 0); the candidates are screened on the *first*
half of the multi-document QA questions (mdqa-20, the first SCREEN_Q questions of half 1, gold
at documents 1, 6, 10, 15, 20); the recipe with the largest mean Δ accuracy over the models
(ties: the smaller mean position gap) is chosen; the chosen recipe is fitted again with seed
1, and base, paper, chosen (seed 0) and chosen (seed 1) are evaluated on the *second* half
(mdqa-20, kv, closed-book, MMLU). Nothing measured on the second half takes part in the choice.

Each step is a `pear` command (printed and logged), so every figure can be reproduced one
command at a time; finished outputs are kept and skipped when the study is run again.
Models run in parallel, one thread of commands per model (`--jobs`).
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
from pear.recipes import RECIPES  # noqa: E402

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
SCREEN_TASK, SCREEN_Q = "mdqa-20", 100
FINAL_TASKS = [("mdqa-20", 300), ("mmlu", None), ("closedbook", None), ("kv", 100)]  # (task, questions of half 2)


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

    def fit(self, model: str, recipe: str, seed: int = 0) -> Path:
        out = self.run_dir(model, recipe, seed)
        if not (out / "model").is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            pear(["run", "--model", self.spec(model), "--recipe", recipe, "--seed", str(seed), "--out", str(out),
                  "--save-dtype", "bf16", "--no-progress", "--force"] + self.common + self.a.run_args, self.log(model))
        return out / "model"

    def log(self, model: str) -> Path:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self.work / "logs" / f"{model}.log"

    def evaluate(self, model: str, variants: list[tuple[str, str]], task: str, half: int, limit, out: Path):
        if out.is_file():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["eval"]
        for label, spec in variants:
            args += ["--model", spec, "--label", label]
        args += ["--task", task, "--half", str(half), "--out", str(out)] + self.eval_common
        if limit:
            args += ["--limit", str(limit)]
        pear(args, self.log(model))

    # ------------------------------------------------------------------ stages
    def stage_fit(self, model: str):
        for r in self.a.recipes:
            self.fit(model, r)

    def stage_screen(self, model: str):
        variants = [("base", self.spec(model))] + [(r, str(self.fit(model, r))) for r in self.a.recipes]
        self.evaluate(model, variants, SCREEN_TASK, 1, self.a.screen_q, self.work / "screen" / f"{model}.json")

    def stage_select(self) -> str:
        table = {}
        for m in self.a.models:
            f = self.work / "screen" / f"{m}.json"
            if f.is_file():
                res = json.loads(f.read_text())["tasks"][SCREEN_TASK]["models"]
                table[m] = {lab: {"all": v["all"]["accuracy"], "gap": _gap(v)} for lab, v in res.items()}
        if not table:
            raise RuntimeError("no screening results")
        score = {}
        for r in self.a.recipes:
            deltas = [t[r]["all"] - t["base"]["all"] for t in table.values() if r in t]
            gaps = [t[r]["gap"] for t in table.values() if r in t]
            if len(deltas) == len(table):
                score[r] = (sum(deltas) / len(deltas), -sum(gaps) / len(gaps))
        chosen = max(score, key=lambda r: score[r])
        sel = {"rule": "largest mean Δ accuracy over the models on mdqa-20 half 1 (ties: smaller mean gap)",
               "models": list(table), "screen": table,
               "score": {r: {"mean_delta": s[0], "mean_gap": -s[1]} for r, s in score.items()}, "chosen": chosen}
        (self.work / "selection.json").write_text(json.dumps(sel, indent=2) + "\n")
        print(json.dumps(sel["score"], indent=1), "\nchosen:", chosen, flush=True)
        return chosen

    def stage_final(self, model: str, chosen: str):
        variants = [("base", self.spec(model)), ("paper", str(self.fit(model, "paper")))]
        if chosen != "paper":
            variants.append((chosen, str(self.fit(model, chosen))))
        variants.append((f"{chosen}-seed1", str(self.fit(model, chosen, seed=1))))
        for task, limit in self.a.final_tasks:
            self.evaluate(model, variants, task, 2, limit, self.work / "final" / f"{model}-{task}.json")

    def per_model(self, stages: list[str], chosen: str | None):
        def go(model):
            try:
                for s in stages:
                    getattr(self, f"stage_{s}")(model, *(() if s != "final" else (chosen,)))
            except Exception as e:  # one model's failure must not stop the others
                print(f"{model}: {e}", flush=True)

        with ThreadPoolExecutor(self.a.jobs) as pool:
            list(pool.map(go, self.a.models))


def _gap(v: dict) -> float:
    accs = [x["accuracy"] for c, x in v.items() if c != "all"]
    return max(accs) - min(accs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for runs, results and logs")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--model-file", default=None, help="model spec pattern, e.g. /data/{model}.gguf (default: presets)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--stage", default="all", choices=["all", "fit", "screen", "select", "final"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", type=int, default=4, help="models in parallel")
    p.add_argument("--screen-q", type=int, default=SCREEN_Q, help="questions of half 1 for screening")
    p.add_argument("--final-limits", default=None, help="e.g. mdqa-20=300,kv=100 (questions of half 2)")
    p.add_argument("--run-args", default="", help="more `pear run` options for every fit (e.g. a quick smoke "
                   "test: '--steps 1 --batch 1 --eval-batch 1')")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=400_000)
    a = p.parse_args()
    a.models, a.recipes, a.run_args = a.models.split(","), a.recipes.split(","), shlex.split(a.run_args)
    limits = dict(FINAL_TASKS)
    for kv in (a.final_limits.split(",") if a.final_limits else []):
        k, v = kv.split("=")
        limits[k] = None if v == "all" else int(v)
    a.final_tasks = list(limits.items())
    st = Study(a)
    if a.stage in ("all", "fit", "screen"):
        st.per_model(["fit", "screen"] if a.stage != "fit" else ["fit"], None)
    if a.stage in ("all", "select", "final"):
        chosen = st.stage_select()
        if a.stage != "select":
            st.per_model(["final"], chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
