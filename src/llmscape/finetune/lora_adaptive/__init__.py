"""``lora-adaptive``: peft LoRA with per-module ranks and alphas from the spectra stage's adaptive-rank
JSON (as Adaptive-Rank LoRA builds it: ``target_modules`` escaped regex, ``rank_pattern``, ``alpha_pattern``, ``r``,
``lora_alpha``). The grid's rank axis does not apply; trainable = sum of r_m * (in + out)."""

from ..method import Method
from .model import (
    AXES,
    NAME,
    Options,
    apply,
    check_inputs,
    checked_targets,
    expected_trainable,
    inputs,
    read_ranks,
    targets,
)

__all__ = ["AXES", "METHOD", "NAME", "Options", "apply", "check_inputs", "checked_targets", "expected_trainable",
           "inputs", "read_ranks", "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=checked_targets,
                expected_trainable=expected_trainable, apply=apply, inputs=inputs, check_inputs=check_inputs)
