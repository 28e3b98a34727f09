"""The weights a fine-tuning run leaves: merged copies of the model, or adapters.

``merged``: base tensors read from the base folder, the run's updates added in fp32, written in the
base dtype with the base's shard layout; every other tensor is copied byte for byte. The folder gets the
base's config and tokenizer files, so it is a normal HF model folder any stage can read.

``adapter`` (the default, finetune.train.checkpoint_format): only what the updates are made of, in one
``adapter.safetensors`` (megabytes instead of a model copy: 16 GB per checkpoint at 8B), keyed
``<base tensor>::<part>``:

    LoRA          lora_A.i, lora_B.i, lora_scaling.i   for each LoRA adapter i of the module
    spectral      U, S, V (the stored top-r triplets) and U2, S2, V2 (the trained ones)
    full          the whole trained tensor (attn-qv in full mode, srank-calibrated's warm phase)

A stage that needs the weights (extraction, spectra) builds them from base plus adapter in memory with
:func:`update_tensor`, the function that writes the merged copies: the tensors are equal to a merged
copy's bit for bit (tested). Both kinds are written under a temporary name and renamed; the model card
(``results/models/{model}/{variant}/model.json``) points at the base folder and, for an adapter, at
the adapter folder too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..io import atomic_dir, write_json
from ..models import weights_checksum
from ..partitioned import gathered
from .common import clean_name
from .spectral import SpectralLinear

ADAPTER_MARKERS = (".lora_", ".spectral_", ".rot_", "lora_dropout", "lora_magnitude")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json")


def _trained(p) -> bool:
    return p.requires_grad or getattr(p, "_llmscape_trained", False)  # trained earlier, frozen now


def _gathered(model):
    """ZeRO-3 partitions parameters: gather the trained ones (adapters are small; a fully trained
    matrix is one matrix) while reading them, so every file gets whole tensors and never an empty
    partition. Every process calls this (a collective); a no-op without ZeRO-3 (partitioned.py)."""
    return gathered([p for p in model.parameters() if _trained(p)])


ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "llmscape-adapter/1"


@torch.no_grad()
def weight_updates(model, accelerator=None) -> dict[str, dict[str, torch.Tensor]]:
    """Per base tensor name (``...q_proj.weight``), the parts its update is made of (module docstring),
    as fp32 (the LoRA scaling float64) tensors on the CPU. Under ZeRO-3 every process must call it (the
    trained tensors are gathered); ``accelerator`` is not needed for that (partitioning is seen on the
    parameters themselves) and kept for the callers' signature."""
    from peft.tuners.lora import LoraLayer

    parts: dict[str, dict[str, torch.Tensor]] = {}
    with _gathered(model):
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and hasattr(mod, "lora_A"):
                p = parts.setdefault(clean_name(name) + ".weight", {})
                for i, ad in enumerate(mod.lora_A):
                    p[f"lora_A.{i}"] = mod.lora_A[ad].weight.detach().float().cpu().clone()
                    p[f"lora_B.{i}"] = mod.lora_B[ad].weight.detach().float().cpu().clone()
                    p[f"lora_scaling.{i}"] = torch.tensor(float(mod.scaling[ad]), dtype=torch.float64)
            elif isinstance(mod, SpectralLinear):
                U2, S2, V2 = (t.detach().float().cpu().clone() for t in mod.factors())
                parts[clean_name(name) + ".weight"] = dict(
                    U=mod.spectral_U.float().cpu().clone(), S=mod.spectral_S.float().cpu().clone(),
                    V=mod.spectral_V.float().cpu().clone(), U2=U2, S2=S2, V2=V2)
        for name, p in model.named_parameters():
            if _trained(p) and not any(m in name for m in ADAPTER_MARKERS):
                parts.setdefault(clean_name(name), {})["full"] = p.detach().float().cpu().clone()
    return parts


def update_delta(parts: dict[str, torch.Tensor]):
    """W' - W (fp32) of a tensor's adapter parts; 0 when it has no low-rank update."""
    d = 0
    i = 0
    while f"lora_A.{i}" in parts:
        d = d + (parts[f"lora_B.{i}"] @ parts[f"lora_A.{i}"]) * float(parts[f"lora_scaling.{i}"])
        i += 1
    if "U2" in parts:
        d = d + ((parts["U2"] * parts["S2"]) @ parts["V2"].T - (parts["U"] * parts["S"]) @ parts["V"].T)
    return d


def update_tensor(t: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The updated tensor in ``t``'s dtype: (the fully trained tensor, else t in fp32) + the low-rank
    delta. The one function that writes merged copies and builds weights from adapters."""
    base = parts["full"] if "full" in parts else t.float()
    return base.add(update_delta(parts)).to(t.dtype)


def save_adapter(model, dest: str | Path, accelerator=None, is_main: bool = True, base_checksum: str = "",
                 extra: dict | None = None) -> Path:
    """Write ``dest``/adapter.safetensors (+ adapter.json) with this model's update parts."""
    from safetensors.torch import save_file

    dest = Path(dest)
    parts = weight_updates(model, accelerator)
    if not is_main:
        return dest
    flat = {f"{k}::{part}": t.contiguous() for k, ps in sorted(parts.items()) for part, t in sorted(ps.items())}
    with atomic_dir(dest) as tmp:
        save_file(flat, tmp / ADAPTER_FILE, metadata=dict(format=ADAPTER_FORMAT, base_checksum=base_checksum))
        info = dict(format=ADAPTER_FORMAT, base_checksum=base_checksum, tensors=len(parts),
                    parameters=int(sum(t.numel() for t in flat.values())), **(extra or {}))
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return dest


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_FILE).exists()


def read_adapter(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The update parts of an adapter folder, by base tensor name."""
    from safetensors import safe_open

    f = Path(folder) / ADAPTER_FILE
    if not f.exists():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_FILE}: not an llmscape adapter. Fix: rerun the "
                                "fine-tuning job that wrote it (snakemake --forcerun finetune)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(f, framework="pt") as sf:
        if (sf.metadata() or {}).get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{f} is not in the {ADAPTER_FORMAT} format")
        for key in sf.keys():
            name, _, part = key.rpartition("::")
            parts.setdefault(name, {})[part] = sf.get_tensor(key)
    return parts


def load_weights(folder: str | Path, base_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's weights as a merged copy holds them: the copy itself, or the base folder's
    tensors with an adapter's updates (:func:`update_tensor`)."""
    from safetensors.torch import load_file

    folder, base_path = Path(folder), Path(base_path)
    if not is_adapter(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    parts = read_adapter(folder)
    out = {k: v for f in sorted(base_path.glob("*.safetensors")) for k, v in load_file(f).items()}
    for k, ps in parts.items():
        out[k] = update_tensor(out[k], ps)
    return out


def save_weights(model, base_path: str | Path, dest: str | Path, fmt: str, accelerator=None, is_main: bool = True,
                 base_checksum: str = "", extra: dict | None = None) -> Path:
    """A run's weights in ``fmt``: ``adapter`` (:func:`save_adapter`) or ``merged`` (:func:`save_merged`)."""
    if fmt == "adapter":
        return save_adapter(model, dest, accelerator, is_main, base_checksum, extra)
    if fmt == "merged":
        return save_merged(model, base_path, dest, accelerator, is_main, extra)
    raise ValueError(f"finetune.train.checkpoint_format {fmt!r} is not one of adapter, merged")


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
    parts = weight_updates(model, accelerator)
    if not is_main:
        return dest
    files = sorted(base_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base_path} holds no *.safetensors; the base model must be a safetensors folder")
    used = set()
    with atomic_dir(dest) as tmp:
        for f in files:
            out = {}
            with safe_open(f, framework="pt") as sf:
                meta = sf.metadata() or {}
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    if k in parts:
                        t = update_tensor(t, parts[k])
                        used.add(k)
                    out[k] = t.contiguous()
            meta.setdefault("format", "pt")
            save_file(out, tmp / f.name, metadata=meta)
        missing = set(parts) - used
        if missing:
            raise KeyError(f"merged updates for tensors absent from {base_path}: {sorted(missing)[:5]}")
        _copy_side_files(base_path, tmp)
        if extra:
            (tmp / "finetune.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
    return dest


def write_card(card: str | Path, base_card: dict, variant: str, folder: str | Path, source: str) -> dict:
    """The model card of a run's weights: a merged folder is a model of its own; an adapter points at
    the base folder and at the adapter, and its checksum covers both."""
    import hashlib

    folder = Path(folder)
    info = dict(model=base_card["model"], label=base_card["label"], variant=variant, source=source,
                trust_remote_code=bool(base_card.get("trust_remote_code", False)))
    if is_adapter(folder):
        both = f"{base_card['checksum']}+{weights_checksum(folder)}"
        info.update(path=base_card["path"], adapter=str(folder.resolve()),
                    checksum=hashlib.sha256(both.encode()).hexdigest())
    else:
        info.update(path=str(folder.resolve()), checksum=weights_checksum(folder))
    write_json(card, info)
    return info
