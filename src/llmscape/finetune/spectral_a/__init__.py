"""``spectral-a``: Spectral^A, additive tuning of the top-r singular vectors (Zhang & Pilanci 2024):
W' = (U_r + B) diag(S_r) (V_r + A^T)^T + W_res, A (r x in) and B (out x r) zero-initialised, S_r frozen,
no alpha/r scaling, no dropout. Trainable = r * (in + out) per target, the same as LoRA at rank r."""

from ..method import Method
from .layer import SpectralALinear
from .model import AXES, NAME, Options, apply, expected_trainable, targets

__all__ = ["AXES", "METHOD", "NAME", "Options", "SpectralALinear", "apply", "expected_trainable", "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=targets, expected_trainable=expected_trainable,
                apply=apply)
