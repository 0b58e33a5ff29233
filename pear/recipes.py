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


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("the paper: copy proxy (n = 50), top-K heads (K auto), 60 steps x 20 sequences, lr 5e-3",
                    fit=dict(objective="copy", scales="heads", steps=60, batch=20, lr=5e-3, penalty=0.0)),
    "long-copy": Recipe("copying at range: a 50-token span at a random depth of 2,048 tokens; every head, "
                        "one scale each, penalty 0.01; 60 steps x 20 sequences, lr 5e-3",
                        fit=dict(objective="long-copy", objective_options={"context": 2048, "span": 50},
                                 scales="all-heads", steps=60, batch=20, lr=5e-3, penalty=0.01)),
    "retrieval": Recipe("SQuAD 2.0 questions among 20 passages, gold at a random position; every head, "
                        "one scale each, penalty 0.01; 60 steps x 20 sequences, lr 5e-3",
                        fit=dict(objective="retrieval", objective_options={"source": "squad", "documents": 20},
                                 scales="all-heads", steps=60, batch=20, lr=5e-3, penalty=0.01)),
}
DEFAULT_RECIPE = "paper"


def get_recipe(name: str | None) -> Recipe:
    name = name or DEFAULT_RECIPE
    if name not in RECIPES:
        raise PearError(f"unknown recipe '{name}'; use one of {', '.join(RECIPES)}")
    return RECIPES[name]
