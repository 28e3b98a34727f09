"""``spectral-r``: Spectral^R, Cayley-orthogonal rotation of the top-r singular vectors (Zhang & Pilanci 2024):
U_r <- U_r Q(A), V_r <- V_r Q(B), optionally S_r <- S_r * c, with Q(M) = (I - K)(I + K)^-1,
K = (M - M^T) / 2, A = B = 0 and c = 1 at initialisation. Trainable = 2 r^2 (+ r with ``scale``) per
target. Only the skew part of A and B acts (r(r-1)/2 effective each); we count the stored 2 r^2, as the
published code does."""

from ..method import Method
from .layer import SpectralRLinear, cayley
from .model import AXES, NAME, Options, apply, expected_trainable, targets

__all__ = ["AXES", "METHOD", "NAME", "Options", "SpectralRLinear", "apply", "cayley", "expected_trainable",
           "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=targets, expected_trainable=expected_trainable,
                apply=apply)
