"""Method name -> :class:`~llmscape.finetune.method.Method` (each method's folder builds its own entry).

A method outside this package (a test's toy method, a researcher's experiment) is added with
:func:`register`; from then on the grid, the workflow and ``train`` treat it as any other."""

from __future__ import annotations

import difflib

from . import attn_qv, lora, lora_adaptive, spectral_a, spectral_r, srank_calibrated
from .common import FinetuneError, default_param_groups
from .method import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (replacing an entry of the same name)."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, not {type(method).__name__}")
    METHODS[method.name] = method
    return method


for _pkg in (lora, lora_adaptive, attn_qv, spectral_a, spectral_r, srank_calibrated):
    register(_pkg.METHOD)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FinetuneError(f"unknown fine-tuning method {name!r}.{hint} Fix: use one of {sorted(METHODS)} in "
                            "finetune.sweeps[].method.") from None


def param_groups(model, run, weight_decay: float = 0.0) -> list[dict]:
    m = get(run.method)
    if m.param_groups is not None:
        return m.param_groups(model, run, weight_decay)
    return default_param_groups(model, run.lr, weight_decay)
