from __future__ import annotations

from dataclasses import dataclass, field

from ..common import DEFAULT_TARGETS, freeze_all, linear_shapes, lora_count, ranked_targets
from ..method import Applied
from ..spectral import wrap
from .layer import SpectralALinear

NAME = "spectral-a"
AXES = ("lr", "rank", "seed")


@dataclass
class Options:
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # the paper's Llama-3 run: q k v up down gate

    def check(self) -> None:
        pass


def targets(shapes, run, ctx=None) -> list[str]:
    return ranked_targets(shapes, run, NAME)


def expected_trainable(shapes, run, ctx=None) -> int:
    return lora_count(shapes, {n: run.rank for n in targets(shapes, run, ctx)})


def apply(model, run, ctx=None) -> Applied:
    names = targets(linear_shapes(model), run, ctx)
    freeze_all(model)
    return Applied(model, wrap(model, names, lambda lin: SpectralALinear(lin, run.rank)))
