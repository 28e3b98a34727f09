"""What every fine-tuning method shares: the run description, target matching, shapes, parameter groups.

The contract of a method (its typed options, hooks and registry entry) is in ``method.py``; the helpers
here are what several methods use: target selection, rank checks, LoRA counts, parameter groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmscapeError
from ..partitioned import full_ndim, full_numel
from ..projections import PROJECTIONS

# a target ``q`` matches ``q_proj`` (and ``q_proj`` itself); by default all seven projections
DEFAULT_TARGETS = PROJECTIONS


class FinetuneError(LlmscapeError, ValueError):
    """Bad fine-tuning configuration or input; the message names the bad value and the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One point of the sweep grid: a method and its hyper-parameters."""

    method: str
    lr: float
    seed: int = 0
    rank: int | None = None
    value_lr_ratio: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (its Options defaults, overridden)

    def opt(self, key: str):
        return self.options[key]


@dataclass
class Context:
    """Files a method reads besides the model: the paths of its declared ``inputs`` (method.py), under the
    names it declared them with. Nothing here knows which method reads what."""

    inputs: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path | None:
        """The file declared as ``name``, or None when the run has none."""
        value = self.inputs.get(name)
        return Path(value) if value else None


def component(name: str) -> str:
    """Last part of a module name: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def match_target(name: str, target: str) -> bool:
    c = component(name)
    return c == target or c == f"{target}_proj"


def select_targets(shapes: dict[str, tuple[int, int]], targets, where: str = "targets") -> list[str]:
    """Names of the Linear modules matching the short target names (never the LM head or embeddings)."""
    targets = list(targets)
    names = [n for n in shapes if layer_index(n) is not None]
    out = [n for n in names if any(match_target(n, t) for t in targets)]
    missing = [t for t in targets if not any(match_target(n, t) for n in names)]
    if missing:
        known = sorted({component(n) for n in names})
        raise FinetuneError(f"{where}: target(s) {missing} match no Linear module of the model. "
                            f"Fix: use names among {known} (or their short forms without '_proj').")
    return out


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear, by module name (peft's ``base_model.model.`` prefix and
    ``.base_layer`` removed, so names equal those of the plain HF model)."""
    import torch.nn as nn

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default")):
            clean = clean_name(name)
            if ".lora_" in clean:
                continue
            out[clean] = (mod.out_features, mod.in_features)
    return out


def clean_name(name: str) -> str:
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer", "")


def meta_shapes(model_path: str | Path, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """Linear shapes from ``config.json`` alone (a model on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return linear_shapes(model)


def ranked_targets(shapes, run, method: str) -> list[str]:
    """The method's configured ``targets`` (finetune.methods.<method>.targets), each checked to take
    ``run.rank`` (shared by every method that adapts a list of matrices at one rank)."""
    names = select_targets(shapes, run.opt("targets"), where=f"finetune.methods.{method}.targets")
    check_rank(shapes, names, run.rank, method)
    return names


def check_rank(shapes, names, rank: int, method: str) -> None:
    """A rank above min(out, in) of a targeted matrix is an error (LoRA would over-parameterise it, the
    spectral methods cannot take more singular vectors than exist)."""
    for n in names:
        if rank > min(shapes[n]):
            raise FinetuneError(f"{method}: rank {rank} is larger than matrix {n} of shape {shapes[n]} "
                                f"allows (min(out, in) = {min(shapes[n])}). Fix: use a rank <= {min(shapes[n])} "
                                "or drop that target.")


def lora_count(shapes, ranks: dict[str, int]) -> int:
    """LoRA's trainable count: r * (in + out) per adapted matrix."""
    return sum(int(r) * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


def default_param_groups(model, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """One learning rate; weight decay only on matrices (never on 1-D parameters: biases, norms, scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if full_ndim(p) < 2 else decay).append(p)  # a ZeRO-3 slice is 1-D: the whole's ndim
    groups = [dict(params=decay, lr=lr, weight_decay=weight_decay, name="matrices"),
              dict(params=no_decay, lr=lr, weight_decay=0.0, name="vectors")]
    return [g for g in groups if g["params"]]


class LoraParts:
    """The update source of a peft LoRA layer (adapters.UpdateSource): every adapter's A, B and scaling."""

    def __init__(self, layer):
        self.layer = layer

    def update_tensors(self) -> list:
        return [m[ad].weight for ad in self.layer.lora_A for m in (self.layer.lora_A, self.layer.lora_B)]

    def update_parts(self) -> dict:
        import torch

        parts, mod = {}, self.layer
        for i, ad in enumerate(mod.lora_A):
            parts[f"lora_A.{i}"] = mod.lora_A[ad].weight.detach().float().cpu().clone()
            parts[f"lora_B.{i}"] = mod.lora_B[ad].weight.detach().float().cpu().clone()
            parts[f"lora_scaling.{i}"] = torch.tensor(float(mod.scaling[ad]), dtype=torch.float64)
        return parts


class WholeTensor:
    """The update source of a parameter trained whole: the tensor replaces the base's."""

    def __init__(self, param):
        self.param = param

    def update_tensors(self) -> list:
        return [self.param]

    def update_parts(self) -> dict:
        return {"full": self.param.detach().float().cpu().clone()}


def lora_layers(model) -> list[tuple[str, LoraParts]]:
    """(base tensor name, update source) of every peft LoRA layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(clean_name(n) + ".weight", LoraParts(m)) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "lora_A")]


def whole_tensors(model, params=None) -> list[tuple[str, WholeTensor]]:
    """(base tensor name, update source) of the parameters trained whole: ``params`` (default: those
    trainable now)."""
    wanted = None if params is None else {id(p) for p in params}
    return [(clean_name(n), WholeTensor(p)) for n, p in model.named_parameters()
            if (p.requires_grad if wanted is None else id(p) in wanted)]


def freeze_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_count(model) -> int:
    """Trainable elements, whole-tensor sizes also for ZeRO-3 partitioned parameters."""
    return sum(full_numel(p) for p in model.parameters() if p.requires_grad)


def replace_module(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_config(targets_regex_or_list, r: int, alpha: float, dropout: float, **kw):
    from peft import LoraConfig

    return LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets_regex_or_list,
                      bias="none", task_type="CAUSAL_LM", **kw)


def names_regex(names) -> str:
    """A regex matching exactly these module names (peft fullmatches a string ``target_modules``)."""
    return "|".join(re.escape(n) for n in names)
