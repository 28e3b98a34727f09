"""The contract between a fine-tuning method and everything else (the grid, the workflow, ``train``).

A method is one folder (``lora/``, ``spectral_a/``, ...) in the manner of peft's tuners: a typed
``Options`` dataclass (its options, their defaults and their ranges), the layer where it has one, the
functions that apply it to a model, and a :class:`Method` object that the registry maps its name to.
Nothing outside the folder names a method: the grid, the workflow, the launcher, ``train`` and the merge
only call the hooks below and pass on what they return, and a method adds itself with
:func:`llmscape.finetune.registry.register`.

What a method declares, and who passes it on:

* the files it reads (``inputs``: name -> path). The workflow makes them the rule's inputs, the job
  description carries them, and the method finds them in :attr:`Context.inputs` under its own names.
* what it adds to training (:class:`Applied`, returned by ``apply``): the model, the trained layers with
  the updates they make (each layer type computes its own, :class:`llmscape.adapters.UpdateSource`) and
  its :class:`Session`.

``shapes`` maps every ``nn.Linear`` module name (without any peft prefix) to ``(out, in)``; it can be
built from a meta-device model at DAG-build time, so a method's checks run before any job is submitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .common import FinetuneError


class Session:
    """What a method does while it trains, beyond its initial ``apply`` (the default does nothing).

    ``train`` calls, in order: :meth:`expected_trainable` once the method is applied, :meth:`before_optimizer`
    and :meth:`after_param_groups` around the optimiser's construction, :meth:`after_step` after every
    optimiser step, and :meth:`metrics` at the end; :meth:`checkpoint_objects` are saved and restored with
    the resume state (each needs ``state_dict``/``load_state_dict``)."""

    single_process: str | None = None  # why several processes or DeepSpeed cannot train it (None: they can)

    def expected_trainable(self, shapes: dict, before: int | None) -> int | None:
        return before

    def before_optimizer(self) -> None:
        pass

    def after_param_groups(self) -> None:
        pass

    def checkpoint_objects(self) -> list:
        return []

    def after_step(self, step: int) -> None:
        pass

    def metrics(self, n_trainable: int) -> dict:
        return {}


@dataclass
class Applied:
    """What ``apply`` gives training: the model ready to train (only the method's parameters trainable),
    the base tensors it updates with the source of each update (``(name, UpdateSource)`` pairs: what the
    adapters and merged copies are written from, and whose buffers the resume state keeps) and its
    session."""

    model: Any
    trained: list = field(default_factory=list)
    session: Session = field(default_factory=Session)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the registry holds it.

    name                 the name in the config grid (``finetune.sweeps[].method``)
    axes                 grid axes it reads (``lr`` and ``seed`` always; ``rank``, ``value_lr_ratio``)
    options              a dataclass: its options with their defaults (config ``finetune.methods.<name>``)
                         and a ``check()`` raising FinetuneError on a value out of range
    targets              (shapes, run, ctx) -> names of the Linear modules it adapts
    expected_trainable   (shapes, run, ctx) -> its trainable-parameter count from the formula, or None when
                         it is known only once the weights are read (then its session gives it)
    apply                (model, run, ctx) -> :class:`Applied`
    param_groups         (model, run, weight_decay) -> optimiser groups (None: one lr, no decay on 1-D)
    inputs               (run, model, ft) -> {name: path} of result files its job reads (the rule's inputs;
                         ``ft`` the finetune config section, ``model`` the model label); the job finds them
                         in ``ctx.inputs`` under the same names
    check_inputs         (run, ctx, producible) -> None; raises when a file it needs is missing and no
                         rule makes it (``producible(path)``: a rule of the workflow makes ``path``)
    launch_constraint    (run) -> why this run cannot use several processes or DeepSpeed, or None
    """

    name: str
    axes: tuple[str, ...]
    options: type
    targets: Callable[..., list[str]]
    expected_trainable: Callable[..., int | None]
    apply: Callable[..., Any]
    param_groups: Callable[..., list[dict]] | None = None
    inputs: Callable[..., dict[str, str]] | None = None
    check_inputs: Callable[..., None] | None = None
    launch_constraint: Callable[..., str | None] | None = None

    def input_files(self, run, model: str, ft: dict) -> dict[str, str]:
        """The result files ``run`` reads (its ``inputs``), by the names the method looks them up under."""
        return dict(self.inputs(run, model, ft)) if self.inputs is not None else {}

    @property
    def defaults(self) -> dict:
        """The options with their defaults, as plain data (what a RunSpec carries)."""
        return dataclasses.asdict(self.options())

    def check_options(self, options: dict, where: str) -> None:
        """Unknown option names and values out of range, named with the key to fix."""
        bad = set(options) - set(self.defaults)
        if bad:
            raise FinetuneError(f"{where}: unknown option(s) {sorted(bad)} for {self.name}. Fix: use "
                                f"{sorted(self.defaults)}.")
        self.options(**{**self.defaults, **options}).check()


def check_choice(method: str, key: str, value, choices) -> None:
    if value not in choices:
        raise FinetuneError(f"{method}: {key} {value!r} is not one of {tuple(choices)}. Fix: set "
                            f"finetune.methods.{method}.{key}.")


def check_int(method: str, key: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FinetuneError(f"{method}: {key} = {value!r} must be an integer >= {minimum}. Fix: set "
                            f"finetune.methods.{method}.{key}.")


def check_number(method: str, key: str, value, lo: float, hi: float, lo_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (lo < value if lo_open else lo <= value) \
        and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise FinetuneError(f"{method}: {key} {value!r} is outside {interval}. Fix: set "
                            f"finetune.methods.{method}.{key}.")
