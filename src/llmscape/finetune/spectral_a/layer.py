from __future__ import annotations

import torch
import torch.nn as nn

from ..spectral import SpectralLinear


class SpectralALinear(SpectralLinear):
    def __init__(self, base: nn.Linear, r: int):
        super().__init__(base, r)
        dev = base.weight.device
        self.spectral_A = nn.Parameter(torch.zeros(self.r, base.in_features, device=dev))  # added to V_r^T
        self.spectral_B = nn.Parameter(torch.zeros(base.out_features, self.r, device=dev))  # added to U_r

    def factors(self):
        return self.spectral_U + self.spectral_B, self.spectral_S, self.spectral_V + self.spectral_A.T
