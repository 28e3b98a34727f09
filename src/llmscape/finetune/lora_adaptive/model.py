from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..common import FinetuneError, linear_shapes, lora_config, lora_count, lora_layers
from ..method import Applied, check_number

NAME = "lora-adaptive"
AXES = ("lr", "seed")


@dataclass
class Options:
    ranks_file: str | None = None  # null: results/spectra/{model}/adaptive_ranks.json from the spectra stage
    dropout: float = 0.05  # Adaptive-Rank LoRA's default (E.2)

    def check(self) -> None:
        check_number(NAME, "dropout", self.dropout, 0, 1, lo_open=False)


def default_ranks_file(model: str) -> str:
    """Where the spectra stage writes the adaptive ranks of ``model``."""
    return f"results/spectra/{model}/adaptive_ranks.json"


def inputs(run, model: str, ft: dict) -> dict[str, str]:
    """The rank file, which the job finds as ``ctx.path("ranks")``."""
    return {"ranks": run.opt("ranks_file") or default_ranks_file(model)}


def _ranks_path(run, ctx):
    return run.opt("ranks_file") or (ctx.path("ranks") if ctx else None)


def check_inputs(run, ctx, producible) -> None:
    """The rank file must exist now unless a rule of the workflow makes it."""
    path = _ranks_path(run, ctx)
    if path is None or not producible(str(path)):
        if path is None or not Path(path).exists():
            raise FinetuneError(
                f"adaptive-rank file {path} does not exist and no rule of this workflow makes it. Fix: run the "
                "spectra stage first (it writes results/spectra/{model}/adaptive_ranks.json), set "
                "finetune.methods.lora-adaptive.ranks_file to an existing file, or drop lora-adaptive from "
                "finetune.sweeps.")


def checked_targets(shapes, run, ctx=None) -> list[str]:
    """The targets, when the rank file can be read yet (before the spectra stage ran, it cannot)."""
    path = _ranks_path(run, ctx)
    return targets(shapes, run, ctx) if path is not None and Path(path).exists() else []


KEYS = ("target_modules", "rank_pattern", "alpha_pattern", "r", "lora_alpha")


def read_ranks(path) -> dict:
    path = Path(path) if path else None
    if path is None or not path.exists():
        raise FinetuneError(f"{NAME}: adaptive-rank file {path} does not exist. Fix: run the spectra stage "
                            "(it writes results/spectra/{model}/adaptive_ranks.json), set "
                            "finetune.methods.lora-adaptive.ranks_file to an existing file, or drop "
                            "lora-adaptive from finetune.sweeps.")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{NAME}: {path} is not valid JSON ({e.msg}). Fix: regenerate it.") from None
    missing = [k for k in KEYS if k not in info]
    if missing:
        raise FinetuneError(f"{NAME}: {path} lacks key(s) {missing}; expected {list(KEYS)}. Fix: regenerate it "
                            "with the spectra stage.")
    return info


def _module_ranks(shapes, info, path) -> dict[str, tuple[int, float]]:
    """Module -> (rank, alpha), resolved the way peft resolves the patterns (fullmatch of the target regex;
    pattern keys match a module name as a suffix)."""
    pat = re.compile(info["target_modules"]) if isinstance(info["target_modules"], str) else None
    tm = info["target_modules"]
    if pat is not None:
        names = [n for n in shapes if pat.fullmatch(n)]
    else:
        names = [n for n in shapes if any(n == t or n.endswith("." + t) for t in tm)]
    if not names:
        raise FinetuneError(f"{NAME}: target_modules of {path} match no Linear module of the model. Fix: "
                            "compute the adaptive ranks for this model.")

    def lookup(pattern: dict, n: str, default):
        for key, v in pattern.items():
            if n == key or n.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", n):
                return v
        return default

    out = {}
    for n in names:
        r = int(lookup(info["rank_pattern"], n, info["r"]))
        a = float(lookup(info["alpha_pattern"], n, info["lora_alpha"]))
        if r < 1 or r > min(shapes[n]):
            raise FinetuneError(f"{NAME}: {path} gives module {n} of shape {shapes[n]} rank {r}, outside "
                                f"1..{min(shapes[n])}. Fix: regenerate the adaptive ranks with r_max <= "
                                f"{min(shapes[n])}.")
        out[n] = (r, a)
    return out


def targets(shapes, run, ctx=None) -> list[str]:
    path = _ranks_path(run, ctx)
    return list(_module_ranks(shapes, read_ranks(path), path))


def expected_trainable(shapes, run, ctx=None) -> int:
    path = _ranks_path(run, ctx)
    mr = _module_ranks(shapes, read_ranks(path), path)
    return lora_count(shapes, {n: r for n, (r, _) in mr.items()})


def apply(model, run, ctx=None) -> Applied:
    from peft import get_peft_model

    path = _ranks_path(run, ctx)
    info = read_ranks(path)
    _module_ranks(linear_shapes(model), info, path)  # validates
    cfg = lora_config(info["target_modules"], info["r"], info["lora_alpha"], run.opt("dropout"),
                      rank_pattern=dict(info["rank_pattern"]), alpha_pattern=dict(info["alpha_pattern"]))
    model = get_peft_model(model, cfg)
    return Applied(model, lora_layers(model))
