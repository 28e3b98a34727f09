"""The weights a fine-tuning run leaves: an adapter (the default, finetune.train.checkpoint_format) or a
merged copy of the model, and the run's model cards.

Both are written from the run's trained layers (:class:`~llmscape.finetune.method.Applied`.trained), each
of which computes its own update (:mod:`llmscape.adapters`); nothing here knows a method or a layer type.

``adapter``: only what the updates are made of, in one ``adapter.safetensors`` (megabytes instead of a
model copy: 16 GB per checkpoint at 8B); its format is :mod:`llmscape.adapters`'.

``merged``: base tensors read from the base folder, the run's updates added in fp32
(:func:`llmscape.adapters.update_tensor`, the function every stage builds a variant's weights with),
written in the base dtype with the base's shard layout; every other tensor is copied byte for byte. The
folder gets the base's config and tokenizer files, so it is a normal HF model folder any stage can read.

Both kinds are written under a temporary name and renamed; the model card
(``results/models/{model}/{variant}/model.json``) points at the base folder and, for an adapter, at the
adapter folder too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..adapters import is_adapter, update_tensor, variant_checksum, weight_updates, write_adapter
from ..io import atomic_dir, write_json
from ..weightfiles import weight_files

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json")


def save_adapter(trained, dest: str | Path, is_main: bool = True, base_checksum: str = "",
                 extra: dict | None = None) -> Path:
    """Write ``dest``/adapter.safetensors (+ adapter.json) with the updates of ``trained`` (every process
    calls it under ZeRO-3: the trained tensors are gathered; the main process writes)."""
    parts = weight_updates(trained)
    return write_adapter(parts, dest, base_checksum, extra) if is_main else Path(dest)


def save_weights(trained, base_path: str | Path, dest: str | Path, fmt: str, is_main: bool = True,
                 base_checksum: str = "", extra: dict | None = None) -> Path:
    """A run's weights in ``fmt``: ``adapter`` (:func:`save_adapter`) or ``merged`` (:func:`save_merged`)."""
    if fmt == "adapter":
        return save_adapter(trained, dest, is_main, base_checksum, extra)
    if fmt == "merged":
        return save_merged(trained, base_path, dest, is_main, extra)
    raise ValueError(f"finetune.train.checkpoint_format {fmt!r} is not one of adapter, merged")


def _copy_side_files(base: Path, dest: Path) -> None:
    for f in base.iterdir():
        if f.is_file() and not any(f.match(p) for p in WEIGHT_FILES):
            shutil.copy2(f, dest / f.name)


def _merge_file(f: Path, parts: dict, out_file: Path) -> set:
    """One base shard with its tensors' updates, written to ``out_file``; returns the names updated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, used = {}, set()
    with safe_open(f, framework="pt") as sf:
        meta = sf.metadata() or {}
        for k in sf.keys():
            t = sf.get_tensor(k)
            if k in parts:
                t = update_tensor(t, parts[k])
                used.add(k)
            out[k] = t.contiguous()
    meta.setdefault("format", "pt")
    save_file(out, out_file, metadata=meta)
    return used


def save_merged(trained, base_path: str | Path, dest: str | Path, is_main: bool = True,
                extra: dict | None = None) -> Path:
    """Write ``dest`` = base weights + the updates of ``trained`` (see module docstring)."""
    base_path, dest = Path(base_path), Path(dest)
    parts = weight_updates(trained)
    if not is_main:
        return dest
    files = weight_files(base_path)
    if not files:
        raise FileNotFoundError(f"{base_path} holds no *.safetensors; the base model must be a safetensors folder")
    with atomic_dir(dest) as tmp:
        used = set().union(*(_merge_file(f, parts, tmp / f.name) for f in files))
        missing = set(parts) - used
        if missing:
            raise KeyError(f"merged updates for tensors absent from {base_path}: {sorted(missing)[:5]}")
        _copy_side_files(base_path, tmp)
        if extra:
            (tmp / "finetune.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str) + "\n")
    return dest


def write_card(card: str | Path, base_card: dict, variant: str, folder: str | Path, source: str) -> dict:
    """The model card of a run's weights: a merged folder is a model of its own; an adapter points at
    the base folder and at the adapter, and its checksum covers both (adapters.variant_checksum)."""
    folder = Path(folder)
    info = dict(model=base_card["model"], label=base_card["label"], variant=variant, source=source,
                trust_remote_code=bool(base_card.get("trust_remote_code", False)))
    if is_adapter(folder):
        info.update(path=base_card["path"], adapter=str(folder.resolve()),
                    checksum=variant_checksum(base_card["path"], folder, base_checksum=base_card["checksum"]))
    else:
        info.update(path=str(folder.resolve()), checksum=variant_checksum(folder))
    write_json(card, info)
    return info
