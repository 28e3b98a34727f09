"""``lora-adaptive``: peft LoRA with per-module ranks and alphas from the spectra stage's adaptive-rank
JSON (as Adaptive-Rank LoRA builds it: ``target_modules`` escaped regex, ``rank_pattern``, ``alpha_pattern``, ``r``,
``lora_alpha``). The grid's rank axis does not apply; trainable = sum of r_m * (in + out)."""

from .model import AXES, DEFAULTS, NAME, apply, expected_trainable, read_ranks, targets  # noqa: F401
