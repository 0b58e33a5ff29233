"""Recipes: named fit settings for `pear run` / `pear fit` (``--recipe NAME``).

A recipe fixes what the coefficients learn (objective and its options), which scales there
are (parameterisation, K) and the optimiser's budget. Options given on the command line
override the recipe's values. ``paper`` is the paper's setting exactly (arXiv 2409.19745:
copy proxy n = 50, top-K heads, 60 AdamW steps of 20 sequences, lr 5e-3); the measured
effect of each recipe is in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PearError


@dataclass(frozen=True)
class Recipe:
    description: str
    k: str = "auto"  # top-K heads (scales "heads" only)
    fit: dict = field(default_factory=dict)  # FitSettings fields


_SHORT = dict(steps=40, batch=10, lr=1e-2, penalty=0.1)  # every head scaled: 400 long sequences in all
_SQUAD20 = {"documents": 20, "words": 100}
_ORACLE = {"teacher": "oracle", "student": "uniform"}
_SELF = {"student": "uniform", "target": "teacher"}  # the model's own right answers as the target

RECIPES: dict[str, Recipe] = {
    "paper": Recipe("the paper: copy proxy (n = 50), top-K heads (K auto), 60 steps x 20 sequences, lr 5e-3",
                    fit=dict(objective="copy", scales="heads", steps=60, batch=20, lr=5e-3, penalty=0.0)),
    "long-copy": Recipe("a 50-token span at a random depth of 2,048 random tokens, copied; one scale per head, "
                        "every head; 40 steps x 10 sequences, lr 1e-2, penalty 0.1",
                        fit=dict(objective="long-copy", objective_options={"context": 2048, "span": 50},
                                 scales="all-heads", **_SHORT)),
    "retrieval": Recipe("SQuAD 2.0 question among 20 passages, gold at a random position; one scale per head, "
                        "every head; 40 steps x 10 sequences, lr 1e-2, penalty 0.1",
                        fit=dict(objective="retrieval", objective_options={"source": "squad", **_SQUAD20},
                                 scales="all-heads", **_SHORT)),
    "retrieval-channels": Recipe("as retrieval, one scale per channel of every head",
                                 fit=dict(objective="retrieval", objective_options={"source": "squad", **_SQUAD20},
                                          scales="channels", **_SHORT)),
    "retrieval-inner-channels": Recipe("as retrieval-channels, the gold passage only at the inner three fifths of "
                                       "the positions (5-16 of 20), where models read worst",
                                       fit=dict(objective="retrieval",
                                                objective_options={"source": "squad", **_SQUAD20, "gold": "inner"},
                                                scales="channels", **_SHORT)),
    "position-distill": Recipe("KL(base, passage first || scaled, passage in the middle) on SQuAD 2.0, 20 passages; "
                               "one scale per head, every head; 40 steps x 10 sequences, lr 1e-2, penalty 0.1",
                               fit=dict(objective="position-distill", objective_options=dict(_SQUAD20),
                                        scales="all-heads", **_SHORT)),
    "oracle-distill": Recipe("KL(base, gold passage alone || scaled, gold passage at any of 20 positions) on SQuAD "
                             "2.0; one scale per head, every head; 40 steps x 10 sequences, lr 1e-2, penalty 0.1",
                             fit=dict(objective="position-distill", objective_options={**_SQUAD20, **_ORACLE},
                                      scales="all-heads", **_SHORT)),
    "oracle-distill-channels": Recipe("as oracle-distill, one scale per channel of every head",
                                      fit=dict(objective="position-distill",
                                               objective_options={**_SQUAD20, **_ORACLE},
                                               scales="channels", **_SHORT)),
    "oracle-self-distill": Recipe("as oracle-distill, the answer the model's own greedy answer with the gold passage "
                                  "alone (where it is right) instead of SQuAD's span",
                                  fit=dict(objective="position-distill",
                                           objective_options={**_SQUAD20, **_ORACLE, **_SELF},
                                           scales="all-heads", **_SHORT)),
    "oracle-self-distill-channels": Recipe("as oracle-self-distill, one scale per channel of every head",
                                           fit=dict(objective="position-distill",
                                                    objective_options={**_SQUAD20, **_ORACLE, **_SELF},
                                                    scales="channels", **_SHORT)),
    "first-self-distill-channels": Recipe("as oracle-self-distill-channels, the teacher reads the same 20 passages "
                                          "with the gold one first (its own answer in a 20-passage prompt)",
                                          fit=dict(objective="position-distill",
                                                   objective_options={**_SQUAD20, "teacher": "first", **_SELF},
                                                   scales="channels", **_SHORT)),
    "last-self-distill-channels": Recipe("as first-self-distill-channels, the gold passage last in the teacher's "
                                         "prompt (where a recency-shaped model reads best)",
                                         fit=dict(objective="position-distill",
                                                  objective_options={**_SQUAD20, "teacher": "last", **_SELF},
                                                  scales="channels", **_SHORT)),
}
DEFAULT_RECIPE = "paper"
# A recipe with some of its settings changed is named RECIPE@KEY=VALUE,... (the study's candidates,
# e.g. "retrieval-channels@anchor=50,anchor_source=questions"); `--recipe` takes such names too.
OVERRIDES = {"lr": float, "steps": int, "batch": int, "penalty": float, "warmup": int, "anchor": float,
             "anchor_source": str, "layers": str, "fold_layers": str,
             "strength": float, "scales": str}  # what RECIPE@KEY=VALUE,... may change, and each value's type
OPTION_OVERRIDES = {"hold": float}  # ... and which of the recipe's objective options (`objective_options`)
NAME_KEYS = {**OVERRIDES, **OPTION_OVERRIDES}  # every KEY a recipe name may set, with its type


def value_text(value) -> str:
    """An OVERRIDES value as RECIPE@KEY=VALUE writes it, read back by `split_name` (floats short:
    50.0 -> "50"; integers whole, so 1000000 stays an integer)."""
    return format(value, "g") if isinstance(value, float) else str(value)
# `pear run` / `pear fit` on a preset without --recipe use its entry here, set only where the recipe
# study's report half confirms the recipe on that model (BENCHMARKS.md §5, round 3, rule 4: above base
# on mdqa-20 for both seeds, MMLU within ±0.5 points, kv and closed-book not significantly lower;
# tests/test_pipeline.py checks it against the HELD_OUT tables below and the study's last choice).
# Every other model, and a preset not listed, gets DEFAULT_RECIPE.
PRESET_DEFAULTS: dict[str, str] = {"gemma3-270m": "retrieval-channels@anchor=50,anchor_source=questions",  # round 7
                                   "smollm2-135m": "last-self-distill-channels@fold_layers=0-4+15-19,strength=2"}  # 14
# A confirmed recipe whose fit needs a GPU to take minutes (self-distillation over 20-document prompts: 12 minutes
# on 1 × H100, over 2 hours on 2 CPU cores) is the default on CUDA only: elsewhere `pear run` keeps the
# paper's recipe, which takes minutes on any CPU, and says which recipe it would have used (`default_note`).
GPU_ONLY_DEFAULTS = {"smollm2-135m"}


def check_recipe_data(settings, data_dir, model: str | None, recipe: str | None, by_default: bool) -> None:
    """The data the fit reads are there, or one clear error; a preset whose own recipe (not named on
    the command line) reads data is told why, and what needs none."""
    try:
        settings.make_objective(data_dir).check_data()
    except PearError as e:
        if not by_default or recipe == DEFAULT_RECIPE:
            raise
        raise PearError(f"{e}. Without --recipe, {model} gets recipe '{recipe}', the study's measured best for this "
                        "preset (BENCHMARKS.md §5), which reads SQuAD 2.0 from that folder; or pass --recipe paper, "
                        "which reads no data") from None


def _preset(model: str | None) -> str:
    from .loading import DEFAULT_MODEL

    return DEFAULT_MODEL if model is None else str(model)


def _gpu_only(model: str | None, device: str | None) -> str | None:
    """The preset's confirmed recipe where it is the default on CUDA alone and `device` is not CUDA."""
    from .loading import parse_device

    if _preset(model) in GPU_ONLY_DEFAULTS and not parse_device(device).startswith("cuda"):
        return PRESET_DEFAULTS[_preset(model)]
    return None


def default_recipe(model: str | None, device: str | None = "auto") -> str:
    """The recipe used when none is named: the preset's confirmed one (on CUDA only where it is in
    GPU_ONLY_DEFAULTS), else DEFAULT_RECIPE."""
    return DEFAULT_RECIPE if _gpu_only(model, device) else PRESET_DEFAULTS.get(_preset(model), DEFAULT_RECIPE)


def default_note(model: str | None, device: str | None = "auto") -> str | None:
    """One line on why the default on `device` is not the preset's confirmed recipe (None where it is)."""
    confirmed = _gpu_only(model, device)
    if confirmed is None:
        return None
    gain = " / ".join(f"{d:+.1f}" for d, _ in HELD_OUT.get(confirmed, {}).get(_preset(model), []))
    return (f"recipe {DEFAULT_RECIPE}: without a GPU the default keeps the paper's recipe (minutes); on CUDA the "
            f"default is {confirmed} ({gain} points on held-out mdqa-20, BENCHMARKS.md §5), whose fit takes "
            f"hours on a CPU: pass --recipe {confirmed} to run it here anyway, or fold the held-out model's "
            f"scales, kept in the repository, with `pear fold` (README, What it does)")


# What each recipe did on the presets, so report.md can say what to expect (BENCHMARKS.md §5, rounds 3
# to 17; tests/test_pipeline.py keeps these tables equal to the study's recorded paired statistics).
# Keys are the study's candidates: a recipe, or a recipe with OVERRIDES changed (`candidate_name`).
MEASURED_ON = ("mdqa-20, first half of the questions (100 × gold at 1/6/10/15/20), seed-0 fit, bf16, 1 × H200 "
               "(rounds 8-11, 14 and 16-18: 1 × H100; round 12: 1 × H200); "
               "Δ accuracy in points vs the base model on the same 500 examples, exact McNemar p")
MEASURED: dict[str, dict[str, tuple[float, float]]] = {  # the screen: candidate: {preset: (Δ points, p)}
    "paper": {"gemma3-270m": (2.6, 0.015), "qwen2.5-coder-0.5b": (-0.2, 1), "smollm2-135m": (0.8, 0.56)},
    "paper@lr=0.02": {"gemma3-270m": (1.8, 0.32), "qwen2.5-coder-0.5b": (1.4, 0.28), "smollm2-135m": (-2.2, 0.18)},
    "long-copy": {"gemma3-270m": (4.4, 0.0071), "qwen2.5-coder-0.5b": (-4.4, 0.0092), "smollm2-135m": (2.4, 0.24)},
    "retrieval": {"gemma3-270m": (3.8, 0.011), "qwen2.5-coder-0.5b": (-4.6, 0.033), "smollm2-135m": (-2.8, 0.12)},
    "retrieval-channels": {"gemma3-270m": (20.6, 4e-18), "qwen2.5-coder-0.5b": (-7.8, 0.00035),
                           "smollm2-135m": (-9.0, 4.3e-06)},
    "retrieval-channels@anchor=10": {"gemma3-270m": (19.6, 9.5e-17), "qwen2.5-coder-0.5b": (-8.8, 6.3e-05),
                                     "smollm2-135m": (-7.8, 7.8e-05)},
    "retrieval-channels@anchor=100": {"gemma3-270m": (17.8, 3e-15), "qwen2.5-coder-0.5b": (-7.0, 0.0016),
                                      "smollm2-135m": (-8.2, 3.8e-05)},
    "position-distill": {"gemma3-270m": (0.8, 0.54), "qwen2.5-coder-0.5b": (-2.4, 0.081), "smollm2-135m": (-1.6, 0.26)},
    "oracle-distill": {"gemma3-270m": (2.6, 0.035), "qwen2.5-coder-0.5b": (-3.8, 0.0026), "smollm2-135m": (2.0, 0.31)},
    "oracle-distill-channels": {"gemma3-270m": (3.4, 0.03), "qwen2.5-coder-0.5b": (0.0, 1),
                                "smollm2-135m": (3.0, 0.14)},
    "oracle-distill-channels@anchor=10": {"gemma3-270m": (3.8, 0.0079), "qwen2.5-coder-0.5b": (-1.2, 0.46),
                                          "smollm2-135m": (1.4, 0.52)},
    "oracle-distill-channels@anchor=100": {"gemma3-270m": (4.0, 0.00082), "qwen2.5-coder-0.5b": (-1.8, 0.21),
                                           "smollm2-135m": (2.0, 0.3)},
    "retrieval-inner-channels": {"gemma3-270m": (21.2, 4.3e-19)},
    "retrieval-inner-channels@anchor=100": {"gemma3-270m": (17.6, 8.6e-16)},
    "retrieval-inner-channels@anchor=1000": {"gemma3-270m": (6.8, 4.5e-05)},
    "retrieval-channels@anchor=1000": {"gemma3-270m": (7.2, 1e-05)},
    "retrieval-channels@anchor=100,anchor_source=questions": {"gemma3-270m": (11.2, 1.2e-09)},
    "retrieval-channels@anchor=30,anchor_source=questions": {"gemma3-270m": (17.4, 8.4e-15)},
    "retrieval-channels@anchor=50,anchor_source=questions": {"gemma3-270m": (14.2, 2.2e-11),
                                                             "qwen2.5-coder-0.5b": (-6.8, 0.0014),
                                                             "smollm2-135m": (-8.8, 2.2e-06),
                                                             "qwen2.5-coder-1.5b": (-6.2, 0.016)},
    "retrieval-channels@anchor=300,anchor_source=questions": {"gemma3-270m": (3.4, 0.012),
                                                              "qwen2.5-coder-0.5b": (-9.0, 1.6e-05),
                                                              "smollm2-135m": (0.0, 1),
                                                              "qwen2.5-coder-1.5b": (1.4, 0.63)},
    "oracle-self-distill": {"gemma3-270m": (0.4, 0.85), "qwen2.5-coder-0.5b": (-1.6, 0.3), "smollm2-135m": (1.6, 0.37)},
    "oracle-self-distill-channels": {"gemma3-270m": (1.6, 0.32), "qwen2.5-coder-0.5b": (-2.6, 0.13),
                                     "smollm2-135m": (2.2, 0.27)},
    "first-self-distill-channels": {"gemma3-270m": (1.2, 0.29), "qwen2.5-coder-0.5b": (0.4, 0.89),
                                    "smollm2-135m": (0.8, 0.71)},
    "last-self-distill-channels": {"gemma3-270m": (1.2, 0.36), "smollm2-135m": (2.0, 0.3)},
    "last-self-distill-channels@hold=0.25": {"smollm2-135m": (0.4, 0.9)},
    "last-self-distill-channels@hold=0.5": {"smollm2-135m": (1.4, 0.47)},
    "last-self-distill-channels@layers=0-4+15-19": {"smollm2-135m": (-0.6, 0.81)},
    "last-self-distill-channels@layers=15-19": {"smollm2-135m": (1.4, 0.44)},
    "first-self-distill-channels@hold=0.5": {"qwen2.5-coder-0.5b": (-0.2, 1)},
    "last-self-distill-channels@fold_layers=15-19": {"smollm2-135m": (2.6, 0.029)},  # round 14: fold-only
    "last-self-distill-channels@fold_layers=15-19,strength=2": {"smollm2-135m": (1.6, 0.37)},
    "last-self-distill-channels@fold_layers=15-19,strength=3": {"smollm2-135m": (-1.8, 0.34)},
    "last-self-distill-channels@fold_layers=0-4+15-19,strength=2": {"smollm2-135m": (3.0, 0.1)},
    "oracle-self-distill-channels@fold_layers=15-19": {"smollm2-135m": (2.2, 0.14)},
    "oracle-self-distill-channels@fold_layers=15-19,strength=2": {"smollm2-135m": (1.6, 0.4)},
    # round 16, fold-only, with round 15's three (on 2 CPU cores round 15 read -0.8 for the first of them)
    "first-self-distill-channels@fold_layers=0-5": {"qwen2.5-coder-0.5b": (-1.0, 0.4)},
    "first-self-distill-channels@fold_layers=0-5,strength=2": {"qwen2.5-coder-0.5b": (-0.6, 0.74)},
    "first-self-distill-channels@fold_layers=12-15": {"qwen2.5-coder-0.5b": (-2.0, 0.087)},
    "first-self-distill-channels@fold_layers=12-15,strength=2": {"qwen2.5-coder-0.5b": (-2.0, 0.17)},
    "first-self-distill-channels@fold_layers=12-17": {"qwen2.5-coder-0.5b": (-1.8, 0.14)},
    "first-self-distill-channels@fold_layers=12-17,strength=2": {"qwen2.5-coder-0.5b": (-1.2, 0.44)},
    "first-self-distill-channels@fold_layers=18-23": {"qwen2.5-coder-0.5b": (-1.0, 0.27)},
    "first-self-distill-channels@fold_layers=18-23,strength=2": {"qwen2.5-coder-0.5b": (-1.4, 0.23)},
    "first-self-distill-channels@fold_layers=6-11": {"qwen2.5-coder-0.5b": (0.6, 0.72)},
    "first-self-distill-channels@fold_layers=6-11,strength=2": {"qwen2.5-coder-0.5b": (-0.2, 1.0)},
    "oracle-self-distill-channels@fold_layers=0-5": {"qwen2.5-coder-0.5b": (-2.4, 0.012)},
    "oracle-self-distill-channels@fold_layers=0-5,strength=2": {"qwen2.5-coder-0.5b": (-3.6, 0.0021)},
    "oracle-self-distill-channels@fold_layers=12-17": {"qwen2.5-coder-0.5b": (-1.4, 0.34)},
    "oracle-self-distill-channels@fold_layers=12-17,strength=2": {"qwen2.5-coder-0.5b": (-1.0, 0.58)},
    "oracle-self-distill-channels@fold_layers=18-23": {"qwen2.5-coder-0.5b": (-0.8, 0.45)},
    "oracle-self-distill-channels@fold_layers=18-23,strength=2": {"qwen2.5-coder-0.5b": (-1.4, 0.26)},
    "oracle-self-distill-channels@fold_layers=6-11": {"qwen2.5-coder-0.5b": (-2.0, 0.13)},
    "oracle-self-distill-channels@fold_layers=6-11,strength=2": {"qwen2.5-coder-0.5b": (-2.0, 0.25)},
    "oracle-self-distill-channels@fold_layers=8-15": {"qwen2.5-coder-0.5b": (-1.0, 0.6)},
    # round 17: scales on the heads' queries
    "long-copy@scales=query-heads": {"smollm2-135m": (-1.4, 0.49), "qwen2.5-coder-0.5b": (-3.4, 0.05),
                                     "qwen2.5-coder-1.5b": (2.8, 0.2)},
    "oracle-self-distill-channels@scales=query-heads": {"smollm2-135m": (1.8, 0.38), "qwen2.5-coder-0.5b": (-1.8, 0.2),
                                                        "qwen2.5-coder-1.5b": (-1.2, 0.48)},
    "oracle-self-distill-channels@scales=query-channels": {"smollm2-135m": (3.8, 0.076), "qwen2.5-coder-1.5b": (2.4, 0.22)},
    # round 18: round 17's near-misses on Qwen2.5-Coder-1.5B pushed further, and long-copy per channel
    "long-copy@strength=2,scales=query-heads": {"qwen2.5-coder-1.5b": (-0.6, 0.87)},
    "oracle-self-distill-channels@strength=2,scales=query-channels": {"qwen2.5-coder-1.5b": (-3.8, 0.093)},
    "long-copy@scales=query-channels": {"qwen2.5-coder-1.5b": (-7.4, 0.0052)},
}
HELD_OUT_ON = ("mdqa-20, second half of the questions (300 × gold at 1/6/10/15/20), not used in any choice; "
               "fits with seed 0 and seed 1")
HELD_OUT: dict[str, dict[str, list[tuple[float, float]]]] = {  # candidate: {preset: [(Δ points, p) per seed]}
    "paper": {"smollm2-135m": [(-0.1, 1), (0.3, 0.7)], "gemma3-270m": [(0.1, 1)],
              "qwen2.5-coder-0.5b": [(1.1, 0.11), (1.3, 0.037)], "qwen2.5-coder-1.5b": [(0.8, 0.26), (0.7, 0.21)]},
    "oracle-distill-channels": {"smollm2-135m": [(3.3, 0.0018), (4.6, 1e-05)],
                                "gemma3-270m": [(5.0, 5.9e-08), (5.3, 1.5e-08)]},
    "retrieval-channels": {"gemma3-270m": [(17.9, 1e-42), (17.1, 5e-39)]},
    "retrieval-channels@anchor=100": {"gemma3-270m": [(16.9, 5.9e-43), (16.7, 1.8e-40)]},
    "retrieval-channels@anchor=50,anchor_source=questions": {"gemma3-270m": [(13.5, 1.9e-31), (14.6, 1.3e-35)]},
    "last-self-distill-channels@fold_layers=0-4+15-19,strength=2": {"smollm2-135m": [(2.7, 0.0018), (2.9, 0.0023)]},
}

# The same questions with every answer's first line cut to its first 20 words (benchmarks/answer_length.py):
# the QA metric looks for the gold answer anywhere in the first line, so longer answers alone can raise it.
HELD_OUT_CUT = 20
HELD_OUT_CUT20: dict[str, dict[str, list[tuple[float, float]]]] = {  # candidate: {preset: [(Δ points, p) per seed]}
    "paper": {"smollm2-135m": [(-0.3, 0.67), (0.0, 1)], "gemma3-270m": [(0.0, 1)],
              "qwen2.5-coder-0.5b": [(0.6, 0.36), (0.3, 0.61)], "qwen2.5-coder-1.5b": [(1.9, 0.0087), (1.1, 0.046)]},
    "oracle-distill-channels": {"smollm2-135m": [(1.0, 0.34), (1.9, 0.05)],
                                "gemma3-270m": [(5.1, 1.2e-08), (5.3, 4e-09)]},
    "retrieval-channels": {"gemma3-270m": [(17.9, 6.3e-44), (17.3, 9e-41)]},
    "retrieval-channels@anchor=100": {"gemma3-270m": [(16.5, 3.2e-43), (16.8, 3.4e-42)]},
    "retrieval-channels@anchor=50,anchor_source=questions": {"gemma3-270m": [(13.4, 1.3e-32), (14.6, 1.1e-37)]},
    "last-self-distill-channels@fold_layers=0-4+15-19,strength=2": {"smollm2-135m": [(2.1, 0.012), (2.3, 0.0095)]},
}

HELD_OUT_OTHER: dict[str, dict[str, dict[str, tuple[float, float]]]] = {  # seed 0: {preset: {task: (Δ, p)}}
    "paper": {"smollm2-135m": {"kv": (-0.7, 0.69), "closedbook": (0.5, 0.52), "mmlu": (0.0, 1)},
              "gemma3-270m": {"kv": (0.7, 0.62), "closedbook": (0.2, 0.73), "mmlu": (0.1, 0.5)},
              "qwen2.5-coder-0.5b": {"kv": (1.0, 0.58), "closedbook": (-0.6, 0.12), "mmlu": (0.8, 2.3e-05)},
              "qwen2.5-coder-1.5b": {"kv": (-8.0, 1.2e-07), "closedbook": (-0.6, 0.12), "mmlu": (-0.4, 0.027)}},
    "oracle-distill-channels": {"smollm2-135m": {"kv": (-0.3, 1), "closedbook": (-1.6, 0.02), "mmlu": (-0.2, 0.02)},
                                "gemma3-270m": {"kv": (-0.3, 1), "closedbook": (0.0, 1), "mmlu": (-0.3, 0.34)}},
    "retrieval-channels": {"gemma3-270m": {"kv": (16.7, 8.1e-13), "closedbook": (0.2, 0.81), "mmlu": (-1.3, 0.0063)}},
    "retrieval-channels@anchor=100": {"gemma3-270m": {"kv": (4.3, 0.00024), "closedbook": (0.0, 1),
                                                      "mmlu": (-0.8, 0.04)}},
    "retrieval-channels@anchor=50,anchor_source=questions": {"gemma3-270m": {"kv": (4.7, 0.00052),
                                                                             "closedbook": (0.3, 0.38),
                                                                             "mmlu": (-0.1, 0.85)}},
    "last-self-distill-channels@fold_layers=0-4+15-19,strength=2": {"smollm2-135m": {"kv": (1.0, 0.55),
                                                                                     "closedbook": (-0.3, 0.73),
                                                                                     "mmlu": (-0.2, 0.016)}},
}


def candidate_name(recipe: str, fit: dict) -> str:
    """The study's name for a fit: its recipe, with the OVERRIDES the fit changed from it
    ("retrieval-channels", {"anchor": 100, ...} -> "retrieval-channels@anchor=100")."""
    base = recipe.partition("@")[0]  # a named change of a recipe counts from the recipe itself
    if base not in RECIPES:
        return recipe
    own = recipe_settings(base).as_dict()
    warm = recipe_settings(base, **{k: fit[k] for k in ("steps",) if k in fit}).warmup_steps  # warm-up follows steps
    changed = [f"{k}={value_text(fit[k])}" for k in OVERRIDES
               if k in fit and fit[k] != (warm if k == "warmup" else own[k])]
    if fit.get("objective", own["objective"]) == own["objective"]:  # options of another objective are not changes
        options, default = fit.get("objective_options") or {}, _options(own["objective"])
        changed += [f"{k}={value_text(options[k])}" for k in OPTION_OVERRIDES
                    if k in options and options[k] != own["objective_options"].get(k, default.get(k))]
    return base + ("@" + ",".join(changed) if changed else "")


def _options(objective: str) -> dict:
    """The objective's options and their defaults."""
    from .objectives import OBJECTIVES

    return OBJECTIVES[objective].OPTIONS


def measured_text(name: str, model: str, named: str | None = None) -> str:
    """report.md's paragraph on what `name` (a candidate: `candidate_name`) is expected to do, with
    the measured tables; a fit that changed options the study did not measure gets the figures of
    the recipe it was run as (`named`, e.g. a preset's RECIPE@KEY=VALUE default), else its recipe's."""
    recipe, _, changed = name.partition("@")
    if name not in MEASURED and named in MEASURED and named != name:
        return (f"This run ran as {name}, changed from `{named}`, a setting the study did not measure; the "
                f"figures below are `{named}`'s.\n\n" + measured_text(named, model))
    if name not in MEASURED and changed and recipe in MEASURED:
        return (f"This run changed {changed.replace(',', ', ')} from recipe `{recipe}`, a setting the study did not "
                f"measure; the figures below are the recipe's as named.\n\n" + measured_text(recipe, model))
    rows, held = MEASURED.get(name, {}), HELD_OUT.get(name, {})
    if not rows:
        return f"Recipe `{name}` has not been measured on the presets (BENCHMARKS.md §5)."
    here = f" This model is `{model}`." if model in rows else (
        " This model is not among them: the effect on it is unknown until `pear eval` measures it.")
    mark = lambda m: f"{m}{' (this model)' if m == model else ''}"  # noqa: E731
    table = "\n".join(f"| {mark(m)} | {d:+.1f} | {p:.2g} |" for m, (d, p) in rows.items())
    text = (f"Measured effect of recipe `{name}` on the presets ({MEASURED_ON}; BENCHMARKS.md §5).{here}\n\n"
            f"| preset | Δ mdqa-20 (points) | p |\n|---|---:|---:|\n{table}")
    if held:
        other, cut = HELD_OUT_OTHER.get(name, {}), HELD_OUT_CUT20.get(name, {})
        pairs = lambda v: [f"{d:+.1f} (p={p:.2g})" for d, p in v] + ["-"] * (2 - len(v))  # noqa: E731
        seeds = "\n".join(f"| {mark(m)} | " + " | ".join(pairs(v)) + " | " + " / ".join(pairs(cut.get(m, []))[:len(v)])
                           + " | " + (", ".join(f"{t} {d:+.1f} (p={p:.2g})" for t, (d, p) in other.get(m, {}).items())
                                      or "-") + " |" for m, v in held.items())
        text += (f"\n\nOn held-out questions ({HELD_OUT_ON}; answers cut to their first {HELD_OUT_CUT} words, "
                 f"seeds 0 / 1, so that longer answers alone cannot count; other tasks: seed 0, Δ points):\n\n"
                 f"| preset | Δ mdqa-20, seed 0 | seed 1 | cut to {HELD_OUT_CUT} words | kv, closed-book, MMLU |\n"
                 f"|---|---:|---:|---|---|\n{seeds}")
    return text


def recipe_settings(name: str | None, **overrides):
    """The FitSettings of recipe `name` with `overrides` on top, as `pear.run` fits them."""
    from .settings import FitSettings

    return FitSettings(**{**get_recipe(name).fit, **overrides})


def split_name(name: str) -> tuple[str, dict]:
    """"RECIPE@KEY=VALUE,..." -> (RECIPE, {KEY: VALUE}), each VALUE of its OVERRIDES type;
    "paper" -> ("paper", {})."""
    recipe, _, changes = name.partition("@")
    if recipe not in RECIPES:
        raise PearError(f"unknown recipe '{recipe}'; use one of {', '.join(RECIPES)}, or RECIPE@KEY=VALUE,...")
    overrides = {}
    for item in changes.split(",") if changes else []:
        key, eq, value = item.partition("=")
        try:
            if not eq or key not in NAME_KEYS or not value:
                raise ValueError
            overrides[key] = NAME_KEYS[key](value)
        except ValueError:
            raise PearError(f"recipe '{name}': '{item}' is not KEY=VALUE with KEY one of {', '.join(NAME_KEYS)} "
                            "and a value of its type") from None
    return recipe, overrides


def canonical_name(name: str) -> str:
    """A RECIPE@KEY=VALUE,... name with its keys in NAME_KEYS order and values as `value_text` writes
    them: the name `candidate_name` gives the fit, so figures recorded under it are found for it
    ("long-copy@scales=query-heads,strength=2.0" -> "long-copy@strength=2,scales=query-heads")."""
    recipe, overrides = split_name(name)
    keys = sorted(overrides, key=list(NAME_KEYS).index)
    return recipe + ("@" + ",".join(f"{k}={value_text(overrides[k])}" for k in keys) if keys else "")


def get_recipe(name: str | None) -> Recipe:
    """Recipe `name` (default DEFAULT_RECIPE), with the changes a RECIPE@KEY=VALUE,... name makes."""
    recipe, overrides = split_name(name or DEFAULT_RECIPE)
    r = RECIPES[recipe]
    if not overrides:
        return r
    said = ", ".join(f"{k} = {value_text(v)}" for k, v in overrides.items())
    fit = {**r.fit, **{k: v for k, v in overrides.items() if k in OVERRIDES}}
    options = {k: v for k, v in overrides.items() if k in OPTION_OVERRIDES}
    if options:
        fit["objective_options"] = {**r.fit.get("objective_options", {}), **options}
    return Recipe(f"{r.description}; with {said}", k=r.k, fit=fit)
