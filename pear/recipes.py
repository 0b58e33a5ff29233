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
}
DEFAULT_RECIPE = "paper"


def get_recipe(name: str | None) -> Recipe:
    name = name or DEFAULT_RECIPE
    if name not in RECIPES:
        raise PearError(f"unknown recipe '{name}'; use one of {', '.join(RECIPES)}")
    return RECIPES[name]
