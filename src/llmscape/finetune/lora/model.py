from __future__ import annotations

from ..common import DEFAULT_TARGETS, lora_config, lora_count, names_regex, ranked_targets

NAME = "lora"
AXES = ("lr", "rank", "seed")
DEFAULTS = dict(
    targets=list(DEFAULT_TARGETS),  # Doimo et al. (A.9): q, k, v, o, gate, up, down
    alpha=16.0,  # scaling alpha / r
    dropout=0.1,
)


def targets(shapes, run, ctx=None) -> list[str]:
    return ranked_targets(shapes, run, NAME)


def expected_trainable(shapes, run, ctx=None) -> int:
    return lora_count(shapes, {n: run.rank for n in targets(shapes, run, ctx)})


def apply(model, run, ctx=None):
    from peft import get_peft_model

    from ..common import linear_shapes

    names = targets(linear_shapes(model), run, ctx)
    cfg = lora_config(names_regex(names), run.rank, run.opt("alpha"), run.opt("dropout"))
    return get_peft_model(model, cfg)
