"""Adapters: the weights of a fine-tuned variant as the updates of its base model's tensors.

One concept, used by every stage that reads a variant's weights: extraction (through ``models.load``),
spectra (``spectra.stream``), interventions (through the cards' checksums) and fine-tuning (which
writes the adapters). It sits on a low floor: it imports only ``weightfiles`` and ``partitioned``, and
none of the stages that use it.

An adapter is one ``adapter.safetensors`` (+ ``adapter.json``) keyed ``<base tensor>::<part>``:

    LoRA          lora_A.i, lora_B.i, lora_scaling.i   for each LoRA adapter i of the module
    spectral      U, S, V (the stored top-r triplets) and U2, S2, V2 (the trained ones)
    full          the whole trained tensor (attn-qv in full mode, srank-calibrated's warm phase)

The parts come from the layers that were trained: each layer type computes its own parts
(:class:`UpdateSource`, as peft's ``get_delta_weight`` does for its layers), and :func:`weight_updates`
gathers them (a collective under ZeRO-3). :func:`update_tensor` turns a base tensor and its parts into
the updated tensor; it is the one function that writes merged copies and builds a variant's weights in
memory, so both are equal bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .io import atomic_dir, rebuild_command
from .partitioned import gathered
from .weightfiles import ModelError, weight_files, weights_checksum

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "llmscape-adapter/1"


class UpdateSource(Protocol):
    """A trained layer (or tensor) as the adapter file sees it."""

    def update_parts(self) -> dict:
        """Its parts (module docstring), fp32 tensors on the CPU (a LoRA scaling as a float64 scalar)."""

    def update_tensors(self) -> list:
        """The parameters :meth:`update_parts` reads: gathered first when ZeRO-3 partitions them."""


def weight_updates(trained: Iterable[tuple[str, UpdateSource]]) -> dict[str, dict]:
    """Per base tensor name (``...q_proj.weight``), the parts of its update, from ``trained`` (pairs of
    base tensor name and the source of its update; a name may have several, e.g. a whole tensor and a
    LoRA). Under ZeRO-3 every process must call it: the sources' tensors are gathered (a collective; a
    no-op without ZeRO-3, partitioned.py)."""
    import torch

    trained = list(trained)
    seen, tensors = set(), []
    for _, src in trained:
        for t in src.update_tensors():
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    parts: dict[str, dict] = {}
    with torch.no_grad(), gathered(tensors):
        for name, src in trained:
            parts.setdefault(name, {}).update(src.update_parts())
    return parts


def update_delta(parts: dict):
    """W' - W (fp32) of a tensor's adapter parts; 0 when it has no low-rank update."""
    d = 0
    i = 0
    while f"lora_A.{i}" in parts:
        d = d + (parts[f"lora_B.{i}"] @ parts[f"lora_A.{i}"]) * float(parts[f"lora_scaling.{i}"])
        i += 1
    if "U2" in parts:
        d = d + ((parts["U2"] * parts["S2"]) @ parts["V2"].T - (parts["U"] * parts["S"]) @ parts["V"].T)
    return d


def update_tensor(t, parts: dict):
    """The updated tensor in ``t``'s dtype: (the fully trained tensor, else t in fp32) + the low-rank
    delta. The one function that writes merged copies and builds weights from adapters."""
    base = parts["full"] if "full" in parts else t.float()
    return base.add(update_delta(parts)).to(t.dtype)


def write_adapter(parts: dict[str, dict], dest: str | Path, base_checksum: str = "", extra: dict | None = None) -> Path:
    """Write ``dest``/adapter.safetensors (+ adapter.json) holding ``parts`` (:func:`weight_updates`),
    under a temporary name renamed when complete."""
    from safetensors.torch import save_file

    dest = Path(dest)
    flat = {f"{k}::{part}": t.contiguous() for k, ps in sorted(parts.items()) for part, t in sorted(ps.items())}
    with atomic_dir(dest) as tmp:
        save_file(flat, tmp / ADAPTER_FILE, metadata=dict(format=ADAPTER_FORMAT, base_checksum=base_checksum))
        info = dict(format=ADAPTER_FORMAT, base_checksum=base_checksum, tensors=len(parts),
                    parameters=int(sum(t.numel() for t in flat.values())), **(extra or {}))
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return dest


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_FILE).exists()


def _rerun(folder: str | Path) -> str:
    """How to rerun the one fine-tuning job that wrote an adapter under results/finetune/<model>/<run>/."""
    parts = Path(folder).parts
    if "finetune" in parts and len(parts) > parts.index("finetune") + 2:
        i = parts.index("finetune")
        metrics = Path(*parts[:i + 3], "metrics.json")
        return f" (`{rebuild_command(metrics)}`, with your run's --configfile and --profile)"
    return ""


def read_adapter(folder: str | Path) -> dict[str, dict]:
    """The update parts of an adapter folder, by base tensor name."""
    from safetensors import safe_open

    f = Path(folder) / ADAPTER_FILE
    if not f.exists():
        raise ModelError(f"{folder} holds no {ADAPTER_FILE}: not an llmscape adapter. Fix: rerun the "
                         f"fine-tuning job that wrote it{_rerun(folder)}.")
    parts: dict[str, dict] = {}
    with safe_open(f, framework="pt") as sf:
        if (sf.metadata() or {}).get("format") != ADAPTER_FORMAT:
            raise ModelError(f"{f} is not in the {ADAPTER_FORMAT} format. Fix: rerun the fine-tuning job that "
                             f"wrote it{_rerun(folder)}.")
        for key in sf.keys():
            name, _, part = key.rpartition("::")
            parts.setdefault(name, {})[part] = sf.get_tensor(key)
    return parts


def load_weights(folder: str | Path, base_path: str | Path) -> dict:
    """Every tensor of a run's weights as a merged copy holds them: the copy itself, or the base folder's
    tensors with an adapter's updates (:func:`update_tensor`)."""
    from safetensors.torch import load_file

    folder, base_path = Path(folder), Path(base_path)
    if not is_adapter(folder):
        return {k: v for f in weight_files(folder) for k, v in load_file(f).items()}
    parts = read_adapter(folder)
    out = {k: v for f in weight_files(base_path) for k, v in load_file(f).items()}
    for k, ps in parts.items():
        out[k] = update_tensor(out[k], ps)
    return out


def _stored_dtypes(base_path: str | Path, names) -> dict:
    """The torch dtype each of ``names`` has in the base folder's files."""
    import torch
    from safetensors import safe_open

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    stored = {}
    for f in weight_files(base_path):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if k in names:
                    stored[k] = dtypes.get(sf.get_slice(k).get_dtype())
    return stored


def apply_adapter(model, base_path: str | Path, adapter: str | Path) -> int:
    """Add an adapter's updates to a loaded model in place, as a merged copy would hold them: each
    updated tensor is rebuilt in the dtype the base folder stores it in (:func:`update_tensor`), then
    cast to the model's. Returns the number of tensors updated."""
    import torch

    parts = read_adapter(adapter)
    stored = _stored_dtypes(base_path, parts)
    params = dict(model.named_parameters())
    missing = sorted(set(parts) - set(params))
    if missing:
        raise ModelError(f"adapter {adapter} updates tensors the model does not have: {missing[:5]}. Fix: "
                         "it belongs to another base model; rerun its fine-tuning job on this one.")
    with torch.no_grad():
        for k, ps in parts.items():
            p = params[k]
            t = p.detach().to("cpu", stored.get(k) or p.dtype)  # as the base folder stores it
            p.copy_(update_tensor(t, ps).to(p.dtype))
    return len(parts)


def variant_checksum(path: str | Path, adapter: str | Path | None = None, base_checksum: str | None = None) -> str:
    """The checksum a model card holds: of the folder's weights, or, for an adapter on a base folder, of
    both (sha256 of ``<base checksum>+<adapter checksum>``). ``base_checksum`` spares hashing the base
    folder again when its card already holds it."""
    base = base_checksum or weights_checksum(path)
    if adapter is None:
        return base
    return hashlib.sha256(f"{base}+{weights_checksum(adapter)}".encode()).hexdigest()
