"""Merged weights: base tensors read from the base folder, adapter deltas added in fp32, written in the
base dtype with the base's shard layout; every other tensor is copied byte for byte. The folder is written
under a temporary name and renamed, and gets the base's config and tokenizer files, so it is a normal HF
model folder any stage can read (and ``results/models/{model}/{variant}/model.json`` points at it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..io import write_json
from ..models import weights_checksum
from .common import clean_name
from .spectral import SpectralLinear

ADAPTER_MARKERS = (".lora_", ".spectral_", ".rot_", "lora_dropout", "lora_magnitude")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json")


def _gathered(model, accelerator=None):
    """ZeRO-3 partitions parameters: gather the trainable ones (adapters are small) while merging."""
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])
    return contextlib.nullcontext()


@torch.no_grad()
def weight_updates(model, accelerator=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(deltas, replacements) by base tensor name (``...q_proj.weight``), on CPU in fp32.

    deltas: adapter contributions (LoRA: scaling * B A; spectral: U'S'V'^T - U S V^T);
    replacements: fully trained base parameters (attn-qv full)."""
    from peft.tuners.lora import LoraLayer

    deltas, repl = {}, {}
    with _gathered(model, accelerator):
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and hasattr(mod, "lora_A"):
                for ad in mod.lora_A:
                    A = mod.lora_A[ad].weight.float()
                    B = mod.lora_B[ad].weight.float()
                    d = (B @ A) * float(mod.scaling[ad])
                    key = clean_name(name) + ".weight"
                    deltas[key] = deltas.get(key, 0) + d.cpu()
            elif isinstance(mod, SpectralLinear):
                deltas[clean_name(name) + ".weight"] = mod.delta_weight().cpu()
        for name, p in model.named_parameters():
            trained = p.requires_grad or getattr(p, "_llmscape_trained", False)  # (srank-calibrated's warm phase)
            if trained and not any(m in name for m in ADAPTER_MARKERS):
                repl[clean_name(name)] = p.detach().float().cpu().clone()
    return deltas, repl


def _copy_side_files(base: Path, dest: Path) -> None:
    for f in base.iterdir():
        if f.is_file() and not any(f.match(p) for p in WEIGHT_FILES):
            shutil.copy2(f, dest / f.name)


def save_merged(model, base_path: str | Path, dest: str | Path, accelerator=None, is_main: bool = True,
                extra: dict | None = None) -> Path:
    """Write ``dest`` = base weights + this model's adapter updates (see module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_path, dest = Path(base_path), Path(dest)
    deltas, repl = weight_updates(model, accelerator)
    if not is_main:
        return dest
    files = sorted(base_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base_path} holds no *.safetensors; the base model must be a safetensors folder")
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    used = set()
    for f in files:
        out = {}
        with safe_open(f, framework="pt") as sf:
            meta = sf.metadata() or {}
            for k in sf.keys():
                t = sf.get_tensor(k)
                if k in deltas or k in repl:  # a replaced (trained) base plus an adapter's delta: both
                    t = (repl[k] if k in repl else t.float()).add(deltas.get(k, 0)).to(t.dtype)
                    used.add(k)
                out[k] = t.contiguous()
        meta.setdefault("format", "pt")
        save_file(out, tmp / f.name, metadata=meta)
    missing = (set(deltas) | set(repl)) - used
    if missing:
        shutil.rmtree(tmp)
        raise KeyError(f"merged updates for tensors absent from {base_path}: {sorted(missing)[:5]}")
    _copy_side_files(base_path, tmp)
    if extra:
        (tmp / "finetune.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def write_card(card: str | Path, base_card: dict, variant: str, folder: str | Path, source: str) -> dict:
    info = dict(model=base_card["model"], label=base_card["label"], variant=variant,
                path=str(Path(folder).resolve()), source=source, checksum=weights_checksum(Path(folder)),
                trust_remote_code=bool(base_card.get("trust_remote_code", False)))
    write_json(card, info)
    return info
