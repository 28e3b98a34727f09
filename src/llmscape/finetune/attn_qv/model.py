from __future__ import annotations

from dataclasses import dataclass

from ...partitioned import full_ndim
from ..common import (
    FinetuneError,
    check_rank,
    component,
    freeze_all,
    linear_shapes,
    lora_config,
    lora_count,
    lora_layers,
    names_regex,
    select_targets,
    whole_tensors,
)
from ..method import Applied, check_choice, check_number

NAME = "attn-qv"
AXES = ("lr", "rank", "value_lr_ratio", "seed")
MODES = ("lora", "full")
ONE_D = ("query", "value", "frozen")


@dataclass
class Options:
    mode: str = "lora"  # lora | full
    alpha: float = 16.0  # LoRA alpha (mode lora)
    dropout: float = 0.1
    one_d: str = "query"  # query | value | frozen: the optimiser group of 1-D trainable parameters
    query: str = "q_proj"
    value: str = "v_proj"

    def check(self) -> None:
        check_choice(NAME, "mode", self.mode, MODES)
        check_choice(NAME, "one_d", self.one_d, ONE_D)
        check_number(NAME, "alpha", self.alpha, 0, 1e6)
        check_number(NAME, "dropout", self.dropout, 0, 1, lo_open=False)


def _check(run):
    Options(**run.options).check()


def targets(shapes, run, ctx=None) -> list[str]:
    _check(run)
    names = select_targets(shapes, [run.opt("query"), run.opt("value")], where=f"finetune.methods.{NAME}")
    if run.opt("mode") == "lora":
        check_rank(shapes, names, run.rank, NAME)
    return names


def expected_trainable(shapes, run, ctx=None, biases: dict[str, int] | None = None) -> int:
    """LoRA: r * (in + out) per q and v matrix; full: out * in per matrix (+ their biases unless frozen)."""
    names = targets(shapes, run, ctx)
    if run.opt("mode") == "lora":
        return lora_count(shapes, {n: run.rank for n in names})
    n_bias = 0 if run.opt("one_d") == "frozen" else sum((biases or {}).get(n, 0) for n in names)
    return sum(shapes[n][0] * shapes[n][1] for n in names) + n_bias


def apply(model, run, ctx=None) -> Applied:
    names = targets(linear_shapes(model), run, ctx)
    if run.opt("mode") == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(names_regex(names), run.rank, run.opt("alpha"), run.opt("dropout")))
        return Applied(model, lora_layers(model))
    freeze_all(model)
    for n in names:
        mod = model.get_submodule(n)
        mod.weight.requires_grad_(True)
        if mod.bias is not None and run.opt("one_d") != "frozen":
            mod.bias.requires_grad_(True)
    return Applied(model, whole_tensors(model))


def _role(name: str, run) -> str:
    """``value`` or ``query`` for a trainable parameter, by the module it belongs to."""
    parts = name.split(".")
    for p in parts:
        if p in (run.opt("value"), f"{run.opt('value')}_proj"):
            return "value"
        if p in (run.opt("query"), f"{run.opt('query')}_proj"):
            return "query"
    return "other"


def param_groups(model, run, weight_decay: float = 0.0) -> list[dict]:
    """Query group at lr, value group at lambda * lr; 1-D parameters go where ``one_d`` says (no decay)."""
    lam = float(run.value_lr_ratio if run.value_lr_ratio is not None else 1.0)
    buckets: dict[tuple[str, bool], list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        one_d = full_ndim(p) < 2  # the whole tensor's (a ZeRO-3 partitioned matrix is a 1-D slice)
        role = run.opt("one_d") if one_d else _role(n, run)
        if role == "other":
            raise FinetuneError(f"{NAME}: trainable parameter {n} is neither a query nor a value parameter "
                                f"({component(n)}). Fix: this is a bug in the target selection.")
        buckets.setdefault((role, one_d), []).append(p)
    groups = []
    for (role, one_d), ps in sorted(buckets.items()):
        groups.append(dict(params=ps, lr=run.lr * (lam if role == "value" else 1.0),
                           weight_decay=0.0 if one_d else weight_decay, name=f"{role}{'-1d' if one_d else ''}"))
    return groups
