"""``lora``: peft LoRA (Hu et al.) on configurable targets; trainable = r * (in + out) per target."""

from .model import AXES, DEFAULTS, NAME, apply, expected_trainable, targets  # noqa: F401
