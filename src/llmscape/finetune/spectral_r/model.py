from __future__ import annotations

from dataclasses import dataclass, field

from ..common import DEFAULT_TARGETS, freeze_all, linear_shapes, ranked_targets
from ..method import Applied, check_choice
from ..spectral import wrap
from .layer import SpectralRLinear

NAME = "spectral-r"
AXES = ("lr", "rank", "seed")


@dataclass
class Options:
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    scale: bool = True  # r trainable singular-value factors

    def check(self) -> None:
        check_choice(NAME, "scale", self.scale, (True, False))


def targets(shapes, run, ctx=None) -> list[str]:
    return ranked_targets(shapes, run, NAME)


def expected_trainable(shapes, run, ctx=None) -> int:
    r = run.rank
    return len(targets(shapes, run, ctx)) * (2 * r * r + (r if run.opt("scale") else 0))


def apply(model, run, ctx=None) -> Applied:
    names = targets(linear_shapes(model), run, ctx)
    freeze_all(model)
    return Applied(model, wrap(model, names, lambda lin: SpectralRLinear(lin, run.rank, scale=bool(run.opt("scale")))))
