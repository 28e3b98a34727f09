from __future__ import annotations

import torch
import torch.nn as nn

from ..spectral import SpectralLinear


def cayley(M: torch.Tensor) -> torch.Tensor:
    """Q = (I - K)(I + K)^-1 = (I + K)^-1 (I - K) for K = (M - M^T)/2: orthogonal for every M, Q(0) = I."""
    K = 0.5 * (M - M.T)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.solve(eye + K, eye - K)


class SpectralRLinear(SpectralLinear):
    def __init__(self, base: nn.Linear, r: int, scale: bool = True):
        super().__init__(base, r)
        dev = base.weight.device
        self.rot_A = nn.Parameter(torch.zeros(self.r, self.r, device=dev))  # rotates U_r
        self.rot_B = nn.Parameter(torch.zeros(self.r, self.r, device=dev))  # rotates V_r
        self.rot_scale = nn.Parameter(torch.ones(self.r, device=dev)) if scale else None

    def rotations(self):
        return cayley(self.rot_A.float()), cayley(self.rot_B.float())

    def factors(self):
        QA, QB = self.rotations()
        S = self.spectral_S * self.rot_scale if self.rot_scale is not None else self.spectral_S
        return self.spectral_U @ QA, S, self.spectral_V @ QB
