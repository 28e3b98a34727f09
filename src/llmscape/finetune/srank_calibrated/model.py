from __future__ import annotations

import math
from pathlib import Path

from ..common import (DEFAULT_TARGETS, FinetuneError, component, lora_config, lora_count, names_regex,
                      ranked_targets)

NAME = "srank-calibrated"
AXES = ("lr", "rank", "seed")
DEFAULTS = dict(
    targets=list(DEFAULT_TARGETS),  # candidate matrices
    direction="low",  # low | high: which end of the stable-rank ranking is tuned
    fraction=0.5,  # share of the layers tuned, per component type
    per_component=True,  # rank within each component type (else all candidates together)
    alpha=16.0,
    dropout=0.1,
    # time-aware start and re-calibration (calibration.py; 0 = off, the static selection above)
    warm_steps=0,  # at most this many full fine-tuning steps of the candidates before the LoRA phase
    warm_check_every=2,  # T: stable ranks measured every T warm steps
    warm_eps=1.0e-3,  # the LoRA phase commences once the relative change of every component's mean srank
    warm_patience=2,  # is below warm_eps for this many consecutive checks
    recalibrate_every=0,  # K: re-select by the current stable ranks every K LoRA steps
)
DIRECTIONS = ("low", "high")


def _check(run):
    if run.opt("direction") not in DIRECTIONS:
        raise FinetuneError(f"{NAME}: direction {run.opt('direction')!r} is not one of {DIRECTIONS}. Fix: set "
                            f"finetune.methods.{NAME}.direction.")
    for key in ("warm_steps", "recalibrate_every", "warm_check_every", "warm_patience"):
        v = run.opt(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key in ("warm_check_every", "warm_patience") else 0):
            raise FinetuneError(f"{NAME}: {key} = {v!r} must be an integer >= "
                                f"{1 if key in ('warm_check_every', 'warm_patience') else 0}. Fix: set "
                                f"finetune.methods.{NAME}.{key}.")
    if not 0 < float(run.opt("fraction")) <= 1:
        raise FinetuneError(f"{NAME}: fraction {run.opt('fraction')} is outside (0, 1]. Fix: set "
                            f"finetune.methods.{NAME}.fraction.")


def targets(shapes, run, ctx=None) -> list[str]:
    """The candidates (the selection needs the weights; see :func:`select`)."""
    _check(run)
    return ranked_targets(shapes, run, NAME)


def stable_ranks(names, ctx=None, weights=None) -> dict[str, float]:
    """srank per candidate: from the spectra parquet (``ctx.stable_ranks``) when it exists, else computed
    from ``weights(name)`` (a callable returning the weight tensor)."""
    pq = getattr(ctx, "stable_ranks", None) if ctx else None
    if pq and Path(pq).exists():
        import pandas as pd

        df = pd.read_parquet(pq)
        if "variant" in df.columns:
            df = df[df.variant == "base"]
        key = {str(n).removesuffix(".weight"): float(s) for n, s in zip(df["name"], df["stable_rank"])}
        missing = [n for n in names if n not in key]
        if missing:
            raise FinetuneError(f"{NAME}: {pq} has no stable_rank for {missing[:3]}... Fix: recompute the spectra "
                                "of the base model, or set finetune.methods.srank-calibrated.stable_ranks to null.")
        return {n: key[n] for n in names}
    weights = weights or getattr(ctx, "weights", None)
    if weights is None:
        raise FinetuneError(f"{NAME}: no stable ranks: neither the spectra parquet nor the weights are available.")
    return {n: stable_rank(weights(n)) for n in names}


def stable_rank(W) -> float:
    """||W||_F^2 / ||W||_2^2 from the singular values (NaN for a zero matrix)."""
    import torch

    s = torch.linalg.svdvals(W.detach().float())
    return float((s ** 2).sum() / s[0] ** 2) if s[0] > 0 else float("nan")


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


def expected_trainable(shapes, run, ctx=None) -> int:
    names = targets(shapes, run, ctx)
    chosen = select(names, stable_ranks(names, ctx), run)
    return lora_count(shapes, {n: run.rank for n in chosen})


def apply(model, run, ctx=None):
    from peft import get_peft_model

    from ..common import linear_shapes

    names = targets(linear_shapes(model), run, ctx)
    sranks = stable_ranks(names, ctx, weights=lambda n: model.get_submodule(n).weight)
    if not (run.opt("warm_steps") or run.opt("recalibrate_every")):  # the static selection
        chosen = select(names, sranks, run)
        model = get_peft_model(model, lora_config(names_regex(chosen), run.rank, run.opt("alpha"), run.opt("dropout")))
        model.srank_selection = chosen  # recorded in the metrics JSON
        return model
    from .calibration import Calibration

    # every candidate carries an adapter; the schedule decides which train (and when)
    model = get_peft_model(model, lora_config(names_regex(names), run.rank, run.opt("alpha"), run.opt("dropout")))
    cal = Calibration(model, names, run, select)
    cal.start(sranks)
    model.srank_calibration = cal
    model.srank_selection = cal.selection
    return model
