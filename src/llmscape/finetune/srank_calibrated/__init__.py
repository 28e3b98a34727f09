"""``srank-calibrated``: LoRA on the matrices chosen by stable rank, per component type.

OUR RECONSTRUCTION of Liu et al. (LREC-COLING 2024; docs/finetune.md): that
paper's code was never released and its selection rule is not public. Here: srank(W) = ||W||_F^2 /
||W||_2^2 for every candidate matrix of the base model; within each component type (q, k, v, o, gate, up,
down) the layers are ranked by srank and the ``fraction`` with the lowest (``direction: low``, the
"lower stable rank generalises better" hypothesis) or highest (``high``) srank get a LoRA adapter of rank
r. ``per_component: false`` ranks all candidates together instead. Stable ranks come from the spectra
stage's ``base.parquet`` when given, else from ``torch.linalg.svdvals`` of the loaded weights.
The time-aware start (a full fine-tuning warm phase until the stable ranks settle, ``warm_steps``) and
re-calibration during training (``recalibrate_every``) are in ``calibration.py``; both are off by default."""

from ...spectra.esd import stable_rank
from ..method import Method
from .model import (
    AXES,
    NAME,
    Options,
    SrankSession,
    apply,
    expected_before_weights,
    inputs,
    launch_constraint,
    select,
    stable_ranks,
    targets,
)

__all__ = ["AXES", "METHOD", "NAME", "Options", "SrankSession", "apply", "expected_before_weights", "inputs",
           "launch_constraint", "select", "stable_rank", "stable_ranks", "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=targets, expected_trainable=expected_before_weights,
                apply=apply, inputs=inputs, launch_constraint=launch_constraint)
