"""Method name -> :class:`~llmscape.finetune.method.Method` (each method's folder builds its own entry;
the folders are found, not listed).

A method outside this package (a test's toy method, a researcher's experiment) is added with
:func:`register`; from then on the grid, the workflow and ``train`` treat it as any other."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path

from .common import Context, FinetuneError, default_param_groups
from .method import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (replacing an entry of the same name)."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, not {type(method).__name__}")
    METHODS[method.name] = method
    return method


def _register_folders() -> None:
    """Every sub-package of this package that defines ``METHOD`` is a method: adding a folder adds it."""
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.ispkg:
            pkg = importlib.import_module(f"{__package__}.{info.name}")
            if isinstance(getattr(pkg, "METHOD", None), Method):
                register(pkg.METHOD)


_register_folders()


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


def context(run, model: str, ft: dict) -> Context:
    """The :class:`Context` of ``run``: the files its method declared (``Method.inputs``), for ``model``
    (the model label) under the finetune config section ``ft``."""
    return Context(inputs=get(run.method).input_files(run, model, ft))
