from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ...partitioned import gathered
from ...spectra.esd import stable_rank
from ..common import (
    DEFAULT_TARGETS,
    FinetuneError,
    component,
    linear_shapes,
    lora_config,
    lora_count,
    lora_layers,
    names_regex,
    ranked_targets,
    whole_tensors,
)
from ..method import Applied, Session, check_choice, check_int, check_number
from .calibration import Calibration

NAME = "srank-calibrated"
AXES = ("lr", "rank", "seed")
DIRECTIONS = ("low", "high")


@dataclass
class Options:
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # candidate matrices
    direction: str = "low"  # low | high: which end of the stable-rank ranking is tuned
    fraction: float = 0.5  # share of the layers tuned, per component type
    per_component: bool = True  # rank within each component type (else all candidates together)
    alpha: float = 16.0
    dropout: float = 0.1
    # time-aware start and re-calibration (calibration.py; 0 = off, the static selection above)
    warm_steps: int = 0  # at most this many full fine-tuning steps of the candidates before the LoRA phase
    warm_check_every: int = 2  # T: stable ranks measured every T warm steps
    warm_eps: float = 1.0e-3  # the LoRA phase commences once the relative change of every component's mean srank
    warm_patience: int = 2  # is below warm_eps for this many consecutive checks
    recalibrate_every: int = 0  # K: re-select by the current stable ranks every K LoRA steps

    def check(self) -> None:
        check_choice(NAME, "direction", self.direction, DIRECTIONS)
        for key in ("warm_steps", "recalibrate_every"):
            check_int(NAME, key, getattr(self, key), 0)
        for key in ("warm_check_every", "warm_patience"):
            check_int(NAME, key, getattr(self, key), 1)
        check_number(NAME, "fraction", self.fraction, 0, 1)
        check_number(NAME, "dropout", self.dropout, 0, 1, lo_open=False)

    @property
    def dynamic(self) -> bool:
        return bool(self.warm_steps or self.recalibrate_every)


def _check(run) -> Options:
    opts = Options(**run.options)
    opts.check()
    return opts


def targets(shapes, run, ctx=None) -> list[str]:
    """The candidates (the selection needs the weights; see :func:`select`)."""
    _check(run)
    return ranked_targets(shapes, run, NAME)


def stable_ranks(names, ctx=None, weights=None) -> dict[str, float]:
    """srank per candidate: from the spectra parquet (the input ``sranks``) when it exists, else computed
    from ``weights(name)`` (a callable returning the weight tensor)."""
    pq = ctx.path("sranks") if ctx else None
    if pq and Path(pq).exists():
        from ...io import read_parquet  # a damaged table is named with the command that rebuilds it

        df = read_parquet(pq)
        if "variant" in df.columns:
            df = df[df.variant == "base"]
        key = {str(n).removesuffix(".weight"): float(s) for n, s in zip(df["name"], df["stable_rank"], strict=True)}
        missing = [n for n in names if n not in key]
        if missing:
            raise FinetuneError(f"{NAME}: {pq} has no stable_rank for {missing[:3]}... Fix: recompute the spectra "
                                "of the base model, or set finetune.methods.srank-calibrated.stable_ranks to null.")
        return {n: key[n] for n in names}
    if weights is None:
        raise FinetuneError(f"{NAME}: no stable ranks: neither the spectra parquet nor the weights are available.")
    out = {}
    for n in names:  # a ZeRO-3 partitioned weight is gathered (every process computes the same ranks)
        w = weights(n)
        with gathered([w]):
            out[n] = stable_rank(w)
    return out


def select(names, sranks: dict[str, float], run) -> list[str]:
    _check(run)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(component(n) if run.opt("per_component") else "all", []).append(n)
    chosen = []
    for _, g in sorted(groups.items()):
        k = max(1, int(math.floor(float(run.opt("fraction")) * len(g) + 0.5)))
        order = sorted(g, key=lambda n: (sranks[n], n), reverse=run.opt("direction") == "high")
        chosen += order[:k]
    return [n for n in names if n in set(chosen)]


def _lora(model, names, run):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(names_regex(names), run.rank, run.opt("alpha"), run.opt("dropout")))


def apply(model, run, ctx=None) -> Applied:
    names = targets(linear_shapes(model), run, ctx)
    sranks = stable_ranks(names, ctx, weights=lambda n: model.get_submodule(n).weight)
    if not _check(run).dynamic:  # the static selection
        chosen = select(names, sranks, run)
        model = _lora(model, chosen, run)
        return Applied(model, lora_layers(model), SrankSession(run, chosen))
    # every candidate carries an adapter; the schedule decides which train (and when)
    model = _lora(model, names, run)
    cal = Calibration(model, names, run, select)
    cal.start(sranks)
    warmed = [cal.base_weight(n) for n in names] if cal.warm_steps > 0 else []  # merged whole, with their LoRA
    return Applied(model, lora_layers(model) + whole_tensors(model, warmed), SrankSession(run, cal.selection, cal))


DYNAMIC_LAUNCH = ("the time-aware start / re-calibration changes the trained set during training, which several "
                  "processes (DDP) and DeepSpeed do not allow. Fix: finetune.launch.num_processes 1 and "
                  "finetune.train.deepspeed null for it, or warm_steps and recalibrate_every of "
                  "finetune.methods.srank-calibrated 0.")


class SrankSession(Session):
    """The selection needs the weights, so the trainable count is known only after ``apply``; with the
    time-aware schedule the trained set changes during training (``calibration.py``)."""

    def __init__(self, run, selection, calibration=None):
        self.run, self.static_selection, self.cal = run, list(selection), calibration
        self.single_process = DYNAMIC_LAUNCH if calibration is not None else None

    def expected_trainable(self, shapes, before):
        if self.cal is not None:
            return None  # the selection is made during training
        return lora_count(shapes, {n: self.run.rank for n in self.static_selection})

    def before_optimizer(self):
        if self.cal is not None:
            self.cal.enable_all()  # the optimiser holds everything the schedule may train

    def after_param_groups(self):
        if self.cal is not None:
            self.cal.apply_flags()

    def checkpoint_objects(self):
        return [self.cal] if self.cal is not None else []

    def after_step(self, step):
        if self.cal is not None:
            self.cal.after_step(step)

    def metrics(self, n_trainable):
        if self.cal is None:
            return dict(srank_selection=self.static_selection, srank_schedule=None)
        return dict(srank_selection=self.cal.selection, trainable_params=self.cal.lft_trainable(),
                    srank_schedule=dict(lft_start_step=self.cal.start_step, events=self.cal.events,
                                        warm_trainable_params=self.cal.warm_trainable()))


def launch_constraint(run) -> str | None:
    return DYNAMIC_LAUNCH if _check(run).dynamic else None


def inputs(run, model: str, ft: dict) -> dict[str, str]:
    """The spectra stage's stable ranks of the base model, unless finetune.stable_ranks_from_spectra is off
    (then they come from the loaded weights)."""
    # (ft is the validated config's section, so the schema's default is there; absent counts as off, as there)
    return {"sranks": f"results/spectra/{model}/base.parquet"} if ft.get("stable_ranks_from_spectra") else {}


def expected_before_weights(shapes, run, ctx=None):
    """Unknown before the weights are read (the session gives it after ``apply``)."""
    targets(shapes, run, ctx)  # the candidates are checked all the same
    return None
