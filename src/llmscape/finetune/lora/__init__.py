"""``lora``: peft LoRA (Hu et al.) on configurable targets; trainable = r * (in + out) per target."""

from ..method import Method
from .model import AXES, NAME, Options, apply, expected_trainable, targets

__all__ = ["AXES", "METHOD", "NAME", "Options", "apply", "expected_trainable", "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=targets, expected_trainable=expected_trainable,
                apply=apply)
