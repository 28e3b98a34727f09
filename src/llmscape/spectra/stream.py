"""Stream the weight matrices of a safetensors folder one tensor at a time and compute their spectra.

Only one matrix (plus its Gram matrix) is in memory at a time: tensors are read by byte range from the
safetensors files with plain file I/O (no memory map, page cache dropped after each read), so a sharded
8B checkpoint runs on a CPU node with a few GB of RAM. Any folder of HF safetensors works: a base model, a
merged fine-tune, an intervened variant or a saved checkpoint.

Singular values are computed from the weights cast to float32:
  * ``method="svd"``: ``torch.linalg.svdvals`` in float32 (fast on CUDA);
  * ``method="gram"``: eigenvalues of the smaller Gram matrix ``W^T W`` (or ``W W^T``) accumulated and
    diagonalised in float64, row block by row block (much faster than an SVD on CPU; float64 keeps the
    small eigenvalues accurate to ~1e-16 of the largest, well below float32 SVD rounding);
  * ``method="auto"``: svd on CUDA, gram on CPU.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapters import read_adapter, update_tensor
from ..devices import pick_device
from ..errors import LlmscapeError
from ..projections import DECODER_MODULES
from ..weightfiles import read_safetensors_header
from . import esd

log = logging.getLogger("llmscape.spectra")

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
MODULE_ORDER = {m: i for i, m in enumerate(EMBEDDING_MODULES[:1] + DECODER_MODULES + EMBEDDING_MODULES[1:])}

_DECODER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(DECODER_MODULES) + r")\.weight$")
_EMBED_RE = re.compile(r"(?:^|\.)(embed_tokens|lm_head)\.weight$")


class SpectraError(LlmscapeError, ValueError):
    pass


@dataclass(frozen=True)
class MatrixRef:
    name: str  # full tensor name, e.g. model.layers.3.mlp.down_proj.weight
    layer: int  # -1 for embed_tokens / lm_head
    module: str  # q_proj ... down_proj, embed_tokens, lm_head
    file: Path

    @property
    def module_name(self) -> str:
        """The nn.Module name peft sees (tensor name without ``.weight``)."""
        return self.name[: -len(".weight")]


def parse_name(name: str) -> tuple[int, str] | None:
    """(layer, module) of a decoder / embedding weight tensor name, None for anything else."""
    m = _DECODER_RE.search(name)
    if m:
        return int(m.group(1)), m.group(2)
    m = _EMBED_RE.search(name)
    if m:
        return -1, m.group(1)
    return None


def list_weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SpectraError(f"{folder} holds no *.safetensors weights. Fix: point at a folder written by "
                           "save_pretrained(safe_serialization=True) (a model card's `path`).")
    return files


def list_matrices(folder: str | Path, modules=DECODER_MODULES, include_embeddings: bool = False) -> list[MatrixRef]:
    """Every selected weight matrix of the folder (names only: nothing is loaded), in depth order."""
    wanted = set(modules) | (set(EMBEDDING_MODULES) if include_embeddings else set())
    refs = []
    for f in list_weight_files(folder):
        for name in read_header(f):
            parsed = parse_name(name)
            if parsed and parsed[1] in wanted:
                refs.append(MatrixRef(name, parsed[0], parsed[1], f))
    if include_embeddings and not any(r.module == "lm_head" for r in refs):
        cfg = Path(folder) / "config.json"
        tied = cfg.exists() and json.loads(cfg.read_text()).get("tie_word_embeddings", False)
        log.info("no lm_head tensor in %s%s: it is reported once, as embed_tokens", folder,
                 " (tie_word_embeddings)" if tied else "")
    refs.sort(key=lambda r: (r.layer if r.layer >= 0 else (1 << 30 if r.module == "lm_head" else -1),
                             MODULE_ORDER[r.module]))
    return refs


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_header(file: str | Path) -> dict:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets} (+ __metadata__);
    a corrupt one is an error naming the file (weightfiles.read_safetensors_header)."""
    return read_safetensors_header(file)[0]


def read_tensor(file: str | Path, name: str, header: dict | None = None):
    """One tensor read with plain file I/O (no memory map): memory is that tensor only, and its pages are
    dropped from the page cache afterwards, so a sharded checkpoint never counts against the job's memory."""
    import os

    import torch

    header = header or read_header(file)
    entry = header[name]
    start, end = entry["data_offsets"]
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        base = 8 + n
        f.seek(base + start)
        buf = bytearray(end - start)
        f.readinto(buf)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), base + start, end - start, os.POSIX_FADV_DONTNEED)
    dtype = getattr(torch, _DTYPES[entry["dtype"]])
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def iter_tensors(refs: list[MatrixRef]) -> Iterator[tuple[MatrixRef, object]]:
    """Yield (ref, tensor) in the order of ``refs``, reading one tensor at a time."""
    headers: dict[Path, dict] = {}
    for r in refs:
        if r.file not in headers:
            headers[r.file] = read_header(r.file)
        yield r, read_tensor(r.file, r.name, headers[r.file])


def compute_eigenvalues(W, method: str = "auto", device: str = "cpu", block_rows: int = 8192) -> np.ndarray:
    """Squared singular values of a 2-D tensor (ascending float64 numpy), see the module docstring."""
    import torch

    if W.ndim != 2:
        raise SpectraError(f"expected a matrix, got shape {tuple(W.shape)}")
    if method == "auto":
        method = "svd" if str(device).startswith("cuda") else "gram"
    if method == "svd":
        s = torch.linalg.svdvals(W.to(device=device, dtype=torch.float32))
        ev = (s.double() ** 2).cpu().numpy()
    elif method == "gram":
        Wt = W if W.shape[0] >= W.shape[1] else W.T  # tall: Gram is the smaller side
        G = torch.zeros(Wt.shape[1], Wt.shape[1], dtype=torch.float64, device=device)
        for s in range(0, Wt.shape[0], block_rows):
            blk = Wt[s:s + block_rows].to(device=device, dtype=torch.float32).double()
            G.addmm_(blk.T, blk)
        # numpy's LAPACK (syevd via OpenBLAS) is several times faster than torch's CPU eigvalsh on these
        # ill-conditioned Gram matrices; on CUDA torch's is used
        ev = np.linalg.eigvalsh(G.numpy()) if G.device.type == "cpu" else torch.linalg.eigvalsh(G).cpu().numpy()
    else:
        raise SpectraError(f"spectra.method must be auto, svd or gram, not {method!r}")
    return np.sort(ev)


def compute_spectra(folder: str | Path, model: str = "", variant: str = "", *, device: str = "auto",
                    method: str = "auto", modules=DECODER_MODULES, include_embeddings: bool = False,
                    esd_options: dict | None = None, return_evals: bool = False, adapter: str | Path | None = None):
    """The spectra table (one row per matrix, columns in :data:`llmscape.spectra.COLUMNS`) of a folder,
    or of a folder plus an llmscape ``adapter`` (each matrix updated as it streams by, equal to a merged
    copy's).

    With ``return_evals`` also a dict tensor name -> ascending eigenvalues.
    """
    import warnings

    import pandas as pd
    import torch

    dev = pick_device(device, key="spectra.device", error=SpectraError)
    refs = list_matrices(folder, modules, include_embeddings)
    if not refs:
        raise SpectraError(f"no decoder weight matrices ({', '.join(modules)}) found in {folder}. Fix: the folder "
                           "must hold a Llama-style model (model.layers.N.self_attn/mlp.*_proj.weight).")
    updates = read_adapter(adapter) if adapter is not None else {}
    rows, evals = [], {}
    t_all = time.perf_counter()
    with torch.no_grad():
        tensors = iter_tensors(refs)
        for i in range(len(refs)):
            ref, W = next(tensors)  # (no enumerate: its cached result tuple would keep the last tensor alive)
            if ref.name in updates:
                W = update_tensor(W, updates[ref.name])
            t0 = time.perf_counter()
            if not torch.isfinite(W).all():
                ev = np.full(min(W.shape), np.nan)
            else:
                ev = compute_eigenvalues(W, method, dev)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", esd.DegenerateMatrixWarning)
                m = esd.compute_metrics(ev, int(W.shape[0]), int(W.shape[1]), name=ref.name, **(esd_options or {}))
            for w in caught:
                log.warning("%s", w.message)
                warnings.warn(w.message, w.category, stacklevel=2)
            rows.append(dict(model=model, variant=variant, layer=ref.layer, module=ref.module, name=ref.name,
                             shape_out=int(W.shape[0]), shape_in=int(W.shape[1]), **m,
                             seconds=time.perf_counter() - t0))
            if return_evals:
                evals[ref.name] = ev
            del W
            el = time.perf_counter() - t_all
            log.info("spectra %d/%d %s %dx%d: stable rank %.2f, alpha_ks %.2f (%.2f s; %.0f s elapsed, ~%.0f s left)",
                     i + 1, len(refs), ref.name, rows[-1]["shape_out"], rows[-1]["shape_in"],
                     m.get("stable_rank", float("nan")), m.get("alpha_ks", float("nan")), rows[-1]["seconds"], el,
                     el / (i + 1) * (len(refs) - i - 1))
    df = pd.DataFrame(rows)
    for k in esd.INT_METRICS:
        df[k] = pd.array([None if (v is None or (isinstance(v, float) and np.isnan(v))) else int(v)
                          for v in df[k]], dtype="Int64")
    df.attrs.update(device=dev, method=method)
    return (df, evals) if return_evals else df
