"""Method name -> method package (see common.py for what a method provides)."""

from __future__ import annotations

import difflib

from . import attn_qv, lora, lora_adaptive, spectral_a, spectral_r, srank_calibrated
from .common import FinetuneError

METHODS = {m.NAME: m for m in (lora, lora_adaptive, attn_qv, spectral_a, spectral_r, srank_calibrated)}


def get(name: str):
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FinetuneError(f"unknown fine-tuning method {name!r}.{hint} Fix: use one of {sorted(METHODS)} in "
                            "finetune.sweeps[].method.") from None


def param_groups(model, run, weight_decay: float = 0.0) -> list[dict]:
    from .common import default_param_groups

    m = get(run.method)
    if hasattr(m, "param_groups"):
        return m.param_groups(model, run, weight_decay)
    return default_param_groups(model, run.lr, weight_decay)
