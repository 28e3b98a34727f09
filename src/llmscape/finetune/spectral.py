"""Shared by the two spectral adapters (Zhang & Pilanci, NeurIPS 2024): the top-r SVD of a frozen weight
under a sign convention, and a wrapper that keeps the original layer and adds a low-rank correction.

Sign convention: each singular pair (u_j, v_j) is flipped so that the entry of u_j with the largest
magnitude is positive. U_r, S_r, V_r are stored as buffers, i.e. saved with the adapter, so a merge never
depends on a fresh SVD (whose signs are arbitrary). All spectral algebra runs in fp32.

Both adapters write W' = U' diag(S') V'^T + W_res with W_res = W - U_r diag(S_r) V_r^T frozen. We keep W
itself and compute y = W x + (U' S' V'^T - U_r S_r V_r^T) x through the rank-r factors: mathematically the
same W', no dense W' per step, and exactly W x at initialisation (the two low-rank terms are identical).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..partitioned import gathered
from .common import replace_module


def top_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (out x r), S_r (r), V_r (in x r) of ``weight`` in fp32, signs fixed by the convention above."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vh[:r].T
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(r, device=U.device)])
    sign[sign == 0] = 1
    # clones: slices of the full SVD would share (and save) its whole storage; safetensors refuses that
    return (U * sign).contiguous(), S.clone(), (V * sign).contiguous()


class SpectralLinear(nn.Module):
    """Base class: a frozen ``base_layer`` plus buffers ``spectral_U``, ``spectral_S``, ``spectral_V``.
    Subclasses define ``factors()`` -> (U', S', V') in fp32."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base_layer = base
        self.r = int(r)
        for p in base.parameters():
            p.requires_grad_(False)
        with gathered([base.weight]):  # whole under ZeRO-3 (every process wraps the same layers in order)
            U, S, V = top_svd(base.weight, self.r)
        self.register_buffer("spectral_U", U)
        self.register_buffer("spectral_S", S)
        self.register_buffer("spectral_V", V)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):  # some HF code reads .weight (dtype/device checks)
        return self.base_layer.weight

    def factors(self):
        raise NotImplementedError

    def update_tensors(self) -> list:
        """Its trained parameters (adapters.UpdateSource): the base layer's weight is not read."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def update_parts(self) -> dict:
        """The stored triplets U, S, V and the trained ones U2, S2, V2 (fp32, CPU)."""
        U2, S2, V2 = (t.detach().float().cpu().clone() for t in self.factors())
        return dict(U=self.spectral_U.float().cpu().clone(), S=self.spectral_S.float().cpu().clone(),
                    V=self.spectral_V.float().cpu().clone(), U2=U2, S2=S2, V2=V2)

    @staticmethod
    def _path(x, U, S, V):
        return ((x @ V.to(x.dtype)) * S.to(x.dtype)) @ U.T.to(x.dtype)

    def forward(self, x):
        y = self.base_layer(x)
        U2, S2, V2 = self.factors()
        delta = self._path(x, U2, S2, V2) - self._path(x, self.spectral_U, self.spectral_S, self.spectral_V)
        return y + delta.to(y.dtype)


def wrap(model, names, make) -> list[tuple[str, SpectralLinear]]:
    """Replace each named nn.Linear by ``make(linear)``; returns (base tensor name, new layer) pairs, the
    update sources of the method's :class:`~llmscape.finetune.method.Applied`."""
    out = []
    for n in names:
        layer = make(model.get_submodule(n))
        replace_module(model, n, layer)
        out.append((n + ".weight", layer))
    return out
