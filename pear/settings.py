"""What a fit is: its settings, one vocabulary for the library, the command line and the reports.

`FitSettings` holds everything that decides the learned coefficients; `pear.recipes` names
sets of them. The paper's values are the defaults: AdamW at lr 5e-3 without weight decay, a
linear schedule with a short warm-up, 60 steps of 20 proxy sequences of n = 50 tokens.

Coefficient range (``bounds``), enforced by projection after every optimiser step:

* ``none``: unbounded. Measured on SmolLM2-135M at lr 2e-2, several α went negative: the
  head was *flipped*, not weakened, and downstream QA did not improve.
* ``nonneg``: [0, ∞). The default, provisionally: it rules out flips, keeps the option of
  amplifying a head. Which range transfers best to multi-document QA is decided with the
  evaluation harness (`pear eval`, base vs each range on the same examples, paired test);
  the default follows that comparison (BENCHMARKS.md).
* ``unit``: [0, 1]: heads can only be weakened, as the paper intends ("suppression heads").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import PearError


@dataclass(frozen=True)
class Bounds:
    """A coefficient range: its name (``--bounds``), limits, and how reports and help say it."""

    name: str
    lo: float | None
    hi: float | None
    text: str  # "[0, 1]"
    help: str  # one phrase for --help

    def project(self, alpha: torch.Tensor) -> None:
        """Clamp `alpha` into the range, in place (after an optimiser step)."""
        if self.lo is not None or self.hi is not None:
            alpha.data.clamp_(min=self.lo, max=self.hi)


BOUNDS = {b.name: b for b in (
    Bounds("none", None, None, "unbounded", "unbounded"),
    Bounds("nonneg", 0.0, None, "[0, ∞)", "[0, inf) (default, provisional)"),
    Bounds("unit", 0.0, 1.0, "[0, 1]", "[0, 1]: heads can only be weakened"),
)}
DEFAULT_BOUNDS = "nonneg"  # provisional, see the module docstring
SCALES = {
    "heads": "one scale per top-K head (the paper)",
    "all-heads": "one scale per head, every head, pulled towards 1 by --penalty",
    "channels": "one scale per channel of every head (head x head_dim), pulled towards 1 by --penalty",
    "query-heads": "one scale per head on its queries, every head (the head's attention temperature: where it "
                   "looks, not what it returns), pulled towards 1 by --penalty",
    "query-channels": "one scale per query channel of every head (head x head_dim; a rotary pair's two channels "
                      "weight that frequency band's share of the attention logits), pulled towards 1 by --penalty",
}
SITE_OF_SCALES = {"query-heads": "query", "query-channels": "query"}  # the others: "output" (`folding.SITES`)


def site_of(scales: str) -> str:
    """Where scales of this parameterisation act (`pear.folding.SITES`): the heads' outputs, or their queries."""
    return SITE_OF_SCALES.get(scales, "output")


def parse_layers(text: str) -> list[int]:
    """"0-4+15-19" -> [0, 1, 2, 3, 4, 15, ..., 19]; "7" -> [7]: the layers that get scales. '+' joins
    ranges (a recipe name separates its settings with ',')."""
    out = []
    for part in text.split("+"):
        a, dash, b = part.partition("-")
        if not (a.strip().isdigit() and (not dash or b.strip().isdigit())) or (dash and int(b) < int(a)):
            raise PearError(f"layers must be ranges A-B or layers N joined by '+' (e.g. 0-4+15-19), got '{text}'")
        out += range(int(a), int(b) + 1) if dash else [int(a)]
    return sorted(set(out))


# ---------------------------------------------------------------------------- settings
@dataclass
class FitSettings:
    """Everything that decides the learned coefficients (and a few things that do not)."""

    steps: int = 60  # optimiser steps (the paper's released checkpoint: step 60)
    batch: int = 20  # proxy sequences per step
    length: int = 50  # n: tokens per copy (sequence = [BOS] x1..xn x1..xn)
    lr: float = 5e-3
    warmup: int | None = None  # linear warm-up steps; None: 10 % of steps, at least 1
    weight_decay: float = 0.0  # AdamW decay would pull every α towards 0, i.e. bias the fit
    bounds: str = DEFAULT_BOUNDS
    seed: int = 0
    eval_batch: int = 20  # held-out proxy sequences for before/after metrics
    objective: str = "copy"  # what the scales learn (`pear.objectives`)
    objective_options: dict = field(default_factory=dict)  # KEY=VALUE options of the objective
    scales: str = "heads"  # parameterisation (SCALES)
    layers: str = ""  # with every-head scales: the layers that get them, e.g. "0-4+15-19" ("": all)
    penalty: float = 0.0  # weight of mean((alpha - 1)^2) added to the loss
    anchor: float = 0.0  # weight of the knowledge anchor, KL(base || scaled) on plain text (`objectives.anchor`)
    anchor_source: str = "paragraphs"  # what the anchor reads: paragraphs, or questions (`objectives.anchor`)
    # what of the fitted scales is kept (`pear.folding.coefficients.select`): the fit itself, its
    # checkpoint and its key do not change; the coefficients it hands over do
    fold_layers: str = ""  # keep the scales of these layers only, e.g. "15-19" ("": all)
    strength: float = 1.0  # each kept scale's distance from 1 times this
    # below: do not change the result (beyond rounding), may differ between resumed runs
    micro_batch: int | None = None  # sequences per forward pass; None: see `default_micro_batch`
    grad_checkpointing: bool = False
    checkpoint_every: int = 10  # steps between checkpoints, and
    checkpoint_seconds: float = 300.0  # at most this long between them (a CPU step can take minutes)

    RESULT_FIELDS = ("steps", "batch", "length", "lr", "warmup", "weight_decay", "bounds", "seed", "eval_batch",
                     "objective", "objective_options", "scales", "layers", "penalty", "anchor", "anchor_source")

    def __post_init__(self):
        if self.bounds not in BOUNDS:
            raise PearError(f"unknown bounds '{self.bounds}'; use one of {', '.join(BOUNDS)}")
        for name in ("steps", "batch", "eval_batch", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise PearError(f"fit setting {name} must be >= 1, got {getattr(self, name)}")
        if not self.checkpoint_seconds >= 0:
            raise PearError(f"fit setting checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")
        if self.length < 2:
            raise PearError(f"proxy length must be >= 2, got {self.length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PearError(f"learning rate must be a positive number, got {self.lr}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise PearError(f"micro batch must be >= 1, got {self.micro_batch}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise PearError(f"warm-up steps must be in 0..{self.steps}, got {self.warmup}")
        if self.scales not in SCALES:
            raise PearError(f"unknown scales '{self.scales}'; use one of {', '.join(SCALES)}")
        if self.layers:
            parse_layers(self.layers)
            if not self.all_heads:
                raise PearError(f"layers {self.layers} needs every-head scales (--scales all-heads or channels); "
                                "with --scales heads discovery chooses the heads")
        if self.fold_layers:
            kept = set(parse_layers(self.fold_layers))  # malformed: one clear error now, not after the fit
            if self.layers and not kept & set(parse_layers(self.layers)):
                raise PearError(f"fold layers {self.fold_layers} keep none of the fitted layers {self.layers}")
        if not math.isfinite(self.strength):
            raise PearError(f"strength must be a finite number, got {self.strength}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise PearError(f"penalty must be a number >= 0, got {self.penalty}")
        if not (math.isfinite(self.anchor) and self.anchor >= 0):
            raise PearError(f"anchor must be a number >= 0, got {self.anchor}")
        from .objectives.anchor import SOURCES

        if self.anchor_source not in SOURCES:
            raise PearError(f"unknown anchor source '{self.anchor_source}'; use one of {', '.join(SOURCES)}")
        obj = self.make_objective()  # unknown objective or option: fail now, before any model work
        # options as the objective reads them (the command line gives strings): one fingerprint per fit
        self.objective_options = {k: obj.options[k] for k in self.objective_options}

    def make_objective(self, data_dir=None):
        """The objective these settings train (the copy proxy's n is `length`)."""
        from .objectives import get_objective

        opts = dict(self.objective_options)
        if self.objective == "copy":
            opts.setdefault("length", self.length)
        return get_objective(self.objective, opts, data_dir)

    @property
    def channels(self) -> bool:
        return self.scales in ("channels", "query-channels")

    @property
    def site(self) -> str:
        """Where the scales act (`site_of`)."""
        return site_of(self.scales)

    @property
    def all_heads(self) -> bool:
        return self.scales != "heads"

    @property
    def warmup_steps(self) -> int:
        return max(1, round(0.1 * self.steps)) if self.warmup is None else int(self.warmup)

    def as_dict(self) -> dict:
        """The fields, with `warmup` resolved to a number of steps."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "warmup": self.warmup_steps}

    def result_key(self) -> dict:
        """What the coefficients depend on. A field added later is left out at its neutral value,
        so fits made before it existed keep their key (their checkpoints still resume)."""
        key = {k: getattr(self, k) for k in self.RESULT_FIELDS} | {"warmup": self.warmup_steps}
        if not self.anchor:
            del key["anchor"]
        if self.anchor_source == "paragraphs":
            del key["anchor_source"]
        if not self.layers:
            del key["layers"]
        return key


def train_seed(seed: int, step: int) -> int:
    """Seed of the training batch at `step`: independent streams per (seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0]).generate_state(1)[0])


def anchor_seed(seed: int, step: int) -> int:
    """Seed of the knowledge anchor's paragraphs at `step` (tag 2; step -1: the held-out ones)."""
    return int(np.random.SeedSequence([seed, step + 1, 2]).generate_state(1)[0])


def heldout_seed(seed: int) -> int:
    """Seed of the fixed held-out batch: a stream no training step uses (tag 1)."""
    return int(np.random.SeedSequence([seed, 0, 1]).generate_state(1)[0])
