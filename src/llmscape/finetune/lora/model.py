from __future__ import annotations

from dataclasses import dataclass, field

from ..common import DEFAULT_TARGETS, linear_shapes, lora_config, lora_count, lora_layers, names_regex, ranked_targets
from ..method import Applied, check_number

NAME = "lora"
AXES = ("lr", "rank", "seed")


@dataclass
class Options:
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # Doimo et al. (A.9): all seven
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.1

    def check(self) -> None:
        check_number(NAME, "alpha", self.alpha, 0, 1e6)
        check_number(NAME, "dropout", self.dropout, 0, 1, lo_open=False)


def targets(shapes, run, ctx=None) -> list[str]:
    return ranked_targets(shapes, run, NAME)


def expected_trainable(shapes, run, ctx=None) -> int:
    return lora_count(shapes, {n: run.rank for n in targets(shapes, run, ctx)})


def apply(model, run, ctx=None) -> Applied:
    from peft import get_peft_model

    names = targets(linear_shapes(model), run, ctx)
    cfg = lora_config(names_regex(names), run.rank, run.opt("alpha"), run.opt("dropout"))
    model = get_peft_model(model, cfg)
    return Applied(model, lora_layers(model))
