"""Time-aware start and re-calibration of ``srank-calibrated`` (OUR RECONSTRUCTION; docs/finetune.md).

Liu et al. describe these only in their abstract; the schedule below is ours (docs/finetune.md) and every
constant is configuration (finetune.methods.srank-calibrated), not a published value:

* **warm phase** (``warm_steps`` > 0): full fine-tuning of the candidate matrices. Every
  ``warm_check_every`` (T) steps the mean stable rank of each component type is measured;
  Delta_t = max over types of |s_t - s_{t-T}| / s_{t-T}. The lightweight phase commences at the first
  check where Delta_t < ``warm_eps`` for ``warm_patience`` consecutive checks, or after ``warm_steps``
  steps at the latest. Then the backbone is frozen (the warm-phase weights are kept and merged) and the
  selection is made on the stable ranks of the *current* weights.
* **re-calibration** (``recalibrate_every`` = K > 0): every K steps of the lightweight phase the stable
  ranks of the effective weights (W + scaling B A) are recomputed and the selected set is replaced when
  the ranking changed. Adapters leaving the set keep their values (and optimiser moments) but stop
  training; adapters joining it start from where they are (zero at first).

All candidates carry a LoRA adapter from the start; "selected" means trainable. Toggling ``requires_grad``
is only sound in one process without DeepSpeed (DDP and ZeRO fix the trained set when they wrap the
model), so train() refuses a dynamic schedule with several processes or DeepSpeed.
"""

from __future__ import annotations

import logging

import torch

from ...spectra.esd import stable_rank
from ..common import component

log = logging.getLogger("llmscape.finetune")


class Calibration:
    """The schedule's state; registered with accelerate, so a resumed run continues the same schedule."""

    def __init__(self, model, names: list[str], run, select):
        self.model, self.names, self.run, self.select = model, list(names), run, select
        self.warm_steps = int(run.opt("warm_steps"))
        self.check_every = max(1, int(run.opt("warm_check_every")))
        self.eps = float(run.opt("warm_eps"))
        self.patience = max(1, int(run.opt("warm_patience")))
        self.recalibrate_every = int(run.opt("recalibrate_every"))
        self.phase = "warm" if self.warm_steps > 0 else "lft"
        self.start_step = None if self.phase == "warm" else 0  # t*: first step of the lightweight phase
        self.calm = 0
        self.prev_means: dict[str, float] | None = None
        self.selection: list[str] = []
        self.events: list[dict] = []  # the schedule's record, for the metrics JSON

    # --- modules and parameters -----------------------------------------------------------------
    def _layer(self, name):
        from peft.tuners.lora import LoraLayer

        mod = self.model.get_submodule(name if name.startswith("base_model.") else f"base_model.model.{name}")
        assert isinstance(mod, LoraLayer), name
        return mod

    def base_weight(self, name):
        return self._layer(name).get_base_layer().weight

    def _adapter_params(self, name):
        mod = self._layer(name)
        return [p for ad in mod.lora_A for p in (mod.lora_A[ad].weight, mod.lora_B[ad].weight)]

    def effective_weight(self, name) -> torch.Tensor:
        mod = self._layer(name)
        W = mod.get_base_layer().weight.detach().float()
        for ad in mod.lora_A:
            W = W + (mod.lora_B[ad].weight.float() @ mod.lora_A[ad].weight.float()) * float(mod.scaling[ad])
        return W

    def enable_all(self) -> None:
        """Everything the schedule may ever train requires grad (so the optimiser holds all of it)."""
        for n in self.names:
            for p in self._adapter_params(n):
                p.requires_grad_(True)
            if self.warm_steps > 0:
                self.base_weight(n).requires_grad_(True)

    def apply_flags(self) -> None:
        chosen = set(self.selection)
        for n in self.names:
            w = self.base_weight(n)
            w.requires_grad_(self.phase == "warm")
            for p in self._adapter_params(n):
                p.requires_grad_(self.phase == "lft" and n in chosen)
                if not p.requires_grad:
                    p.grad = None

    def lft_trainable(self) -> int:
        """Adapter parameters trained at one time in the LoRA phase (the current selection)."""
        return sum(p.numel() for n in self.selection for p in self._adapter_params(n))

    def warm_trainable(self) -> int:
        """Parameters trained in the warm phase (the candidates' full matrices; 0 without one)."""
        return sum(self.base_weight(n).numel() for n in self.names) if self.warm_steps > 0 else 0

    # --- the schedule -----------------------------------------------------------------------------
    @torch.no_grad()
    def stable_ranks(self) -> dict[str, float]:
        return {n: stable_rank(self.effective_weight(n)) for n in self.names}

    def _means(self, sr: dict[str, float]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for n, s in sr.items():
            groups.setdefault(component(n), []).append(s)
        return {c: sum(v) / len(v) for c, v in sorted(groups.items())}

    def start(self, initial_sranks: dict[str, float]) -> None:
        """Step 0: in the warm phase nothing is selected yet; without it, select now."""
        self.prev_means = self._means(initial_sranks)
        if self.phase == "lft":
            self.selection = self.select(self.names, initial_sranks, self.run)
        self.events.append(dict(step=0, event="start", phase=self.phase, srank_means=self.prev_means,
                                selection=list(self.selection)))
        self.apply_flags()

    def after_step(self, step: int) -> None:
        if self.phase == "warm":
            if step % self.check_every and step < self.warm_steps:
                return
            sr = self.stable_ranks()
            means = self._means(sr)
            delta = max(abs(means[c] - self.prev_means[c]) / self.prev_means[c] for c in means)
            self.prev_means = means
            self.calm = self.calm + 1 if delta < self.eps else 0
            self.events.append(dict(step=step, event="check", delta=delta, calm=self.calm, srank_means=means))
            if self.calm >= self.patience or step >= self.warm_steps:
                self.phase, self.start_step = "lft", step
                self.selection = self.select(self.names, sr, self.run)
                why = "stable ranks settled" if self.calm >= self.patience else "warm_steps reached"
                self.events.append(dict(step=step, event="commence", why=why, selection=list(self.selection)))
                log.info("srank-calibrated: lightweight phase from step %d (%s, Delta %.2e); %d of %d matrices",
                         step, why, delta, len(self.selection), len(self.names))
                self.apply_flags()
            return
        K = self.recalibrate_every
        if K > 0 and (step - self.start_step) > 0 and (step - self.start_step) % K == 0:
            sr = self.stable_ranks()
            new = self.select(self.names, sr, self.run)
            if new != self.selection:
                added = sorted(set(new) - set(self.selection))
                dropped = sorted(set(self.selection) - set(new))
                self.events.append(dict(step=step, event="recalibrate", added=added, dropped=dropped))
                log.info("srank-calibrated: step %d re-calibration swaps %d matrices", step, len(added))
                self.selection = new
                self.apply_flags()
            else:
                self.events.append(dict(step=step, event="recalibrate", added=[], dropped=[]))

    @property
    def dynamic(self) -> bool:
        return self.warm_steps > 0 or self.recalibrate_every > 0

    def state_dict(self) -> dict:
        return dict(phase=self.phase, start_step=self.start_step, calm=self.calm, prev_means=self.prev_means,
                    selection=self.selection, events=self.events)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        self.apply_flags()
