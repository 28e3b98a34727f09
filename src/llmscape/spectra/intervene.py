"""Controlled stable-rank intervention (after the correlation/intervention design built on Liu et al. 2024;
docs/spectra.md): a new model variant whose matrices in one module group have a chosen stable rank ``s*``,
everything else unchanged.

For each matrix ``W = sum_i s_i u_i v_i^T`` of the group, with ``R = sum_{j>=2} s_j^2``, the top
singular value is replaced by ``s_1' = sqrt(R / (s* - 1))`` and nothing else:

    W' = W + (s_1' - s_1) u_1 v_1^T

so the other singular values and all singular vectors are unchanged and ``srank(W') = (s_1'^2 + R) /
s_1'^2 = s*`` exactly, provided ``s_1'`` stays the largest singular value, i.e. ``s* <= 1 + R / s_2^2``
(otherwise the target is unreachable by moving ``s_1`` alone and the variant is refused with that bound).
``s_1, u_1, v_1`` come from the eigen-decomposition of the smaller Gram matrix in float64. Embeddings
and lm_head are never touched.

The variant is a normal HF safetensors folder (``results/variants/{model}/{variant}/hf``): config and
tokenizer files are copied, shards without a touched tensor are hard-linked (copied across
filesystems), shards with one are rewritten with the new tensors in the original dtype; the folder is
built under a temporary name and renamed when complete. Its model card
``results/models/{model}/{variant}/model.json`` makes it consumable by extraction, geometry and spectra
like any other variant; ``intervention.json`` beside ``hf/`` records per matrix the stable rank before,
the target, the stable rank reached (measured on the saved tensor) and s_1 before / after.

Variant names: ``srank-{group}-{target}``, group one of :data:`GROUPS` (letters only, since the variant
wildcard has no underscore), target formatted without trailing zeros (``srank-up-2``, ``srank-mlp-1.5``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_dir, write_json
from ..projections import PROJECTION_GROUPS
from ..weightfiles import weights_checksum
from .esd import stable_rank
from .stream import SpectraError, list_weight_files, parse_name

log = logging.getLogger("llmscape.spectra")

GROUPS = PROJECTION_GROUPS  # q k v o gate up down (one module each), attn, mlp, all
_VARIANT_RE = re.compile(r"srank-([a-z]+)-([0-9]+(?:\.[0-9]+)?)")


class InterventionError(SpectraError):
    pass


def format_target(target: float) -> str:
    s = f"{float(target):.6f}".rstrip("0").rstrip(".")
    return s


def variant_name(group: str, target: float) -> str:
    if group not in GROUPS:
        raise InterventionError(f"unknown module group {group!r}; choose from {', '.join(GROUPS)}")
    return f"srank-{group}-{format_target(target)}"


def parse_variant(name: str) -> tuple[str, float]:
    m = _VARIANT_RE.fullmatch(name)
    if not m or m.group(1) not in GROUPS:
        raise InterventionError(f"{name!r} is not an intervention variant name srank-<group>-<target>")
    return m.group(1), float(m.group(2))


def compute_top_triplet(W):
    """(s_1, s_2, R = sum_{j>=2} s_j^2, u_1, v_1) of a float64 torch matrix via its smaller Gram matrix."""
    import torch

    tall = W.shape[0] >= W.shape[1]
    G = W.T @ W if tall else W @ W.T
    evals, evecs = torch.linalg.eigh(G)
    lam = evals.clamp_min(0)
    s1 = float(lam[-1].sqrt())
    s2 = float(lam[-2].sqrt()) if lam.numel() > 1 else 0.0
    R = float((W * W).sum()) - s1 ** 2  # ||W||_F^2 - s_1^2, accurate also when lam has rounding
    x = evecs[:, -1]
    if tall:
        v1 = x
        u1 = W @ v1 / s1
    else:
        u1 = x
        v1 = W.T @ u1 / s1
    return s1, s2, max(R, 0.0), u1, v1


def compute_srank_update(W, target: float, name: str = "", device: str = "cpu"):
    """Return (W', info): W' has stable rank ``target`` by the closed form of the module docstring."""
    import torch

    if not target > 1:
        raise InterventionError(f"target stable rank must be > 1 (got {target}); 1 means rank one")
    Wd = W.to(device=device, dtype=torch.float64)
    s1, s2, R, u1, v1 = compute_top_triplet(Wd)
    if s1 == 0 or R == 0:
        raise InterventionError(f"{name}: matrix is zero or rank one, its stable rank cannot be set")
    s1_new = math.sqrt(R / (target - 1))
    max_target = 1 + R / s2 ** 2 if s2 > 0 else math.inf
    if s1_new < s2:
        raise InterventionError(
            f"{name}: target stable rank {target} is unreachable by changing s_1 alone (s_1 would fall below "
            f"s_2); the largest reachable value is 1 + R/s_2^2 = {max_target:.4f}. Fix: choose smaller "
            "spectra.intervene.targets or another group.")
    Wn = Wd + (s1_new - s1) * torch.outer(u1, v1)
    info = dict(name=name, srank_before=(s1 ** 2 + R) / s1 ** 2, target=float(target), s1_before=s1,
                s1_after=s1_new, s2=s2, max_target=max_target)
    return Wn, info


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def intervene_folder(src: str | Path, dest: str | Path, group: str, target: float, device: str = "cpu") -> dict:
    """Write the intervened copy of the model folder ``src`` to ``dest`` (atomically); return the summary."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dest = Path(src), Path(dest)
    if group not in GROUPS:
        raise InterventionError(f"unknown module group {group!r}; choose from {', '.join(GROUPS)}")
    modules = set(GROUPS[group])
    with atomic_dir(dest, tmp_name=dest.name + ".tmp") as tmp:
        shards = {f.name for f in list_weight_files(src)}
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in shards:
                shutil.copy2(f, tmp / f.name)
        matrices = []
        for shard in list_weight_files(src):
            with safe_open(str(shard), framework="pt") as h:
                touched = [k for k in h.keys() if (p := parse_name(k)) and p[0] >= 0 and p[1] in modules]
                if not touched:
                    _link_or_copy(shard, tmp / shard.name)
                    continue
                meta = dict(h.metadata() or {"format": "pt"})
                tensors = {}
                for k in h.keys():
                    t = h.get_tensor(k)
                    if k in touched:
                        Wn, info = compute_srank_update(t, target, k, device)
                        t = Wn.to(device="cpu", dtype=t.dtype).contiguous()
                        info["srank_after"] = stable_rank(t)
                        matrices.append(info)
                    tensors[k] = t
            meta["llmscape_intervention"] = json.dumps(dict(kind="stable_rank", group=group, target=float(target)))
            save_file(tensors, str(tmp / shard.name), metadata=meta)
            del tensors
        if not matrices:
            raise InterventionError(f"no {', '.join(sorted(modules))} matrices in {src}")
    errs = [abs(m["srank_after"] - m["target"]) for m in matrices]
    log.info("intervention %s -> %s: %d matrices, stable rank %s, max |achieved - target| %.2e", group,
             target, len(matrices), f"{np.mean([m['srank_before'] for m in matrices]):.3f} (mean before)",
             max(errs))
    return dict(kind="stable_rank", group=group, modules=sorted(modules), target=float(target),
                max_abs_error=max(errs), matrices=matrices)


def make_variant(base_card: dict, variant: str, hf_dir: str | Path, card_out: str | Path,
                 summary_out: str | Path, device: str = "cpu") -> dict:
    """The ``intervene`` rule: write the variant folder, its summary and its model card."""
    group, target = parse_variant(variant)
    summary = intervene_folder(base_card["path"], hf_dir, group, target, device)
    summary.update(base_variant=base_card["variant"], base_checksum=base_card["checksum"], variant=variant)
    write_json(summary_out, summary)
    card = dict(model=base_card["model"], label=base_card["label"], variant=variant,
                path=str(Path(hf_dir).resolve()),
                source=f"intervention:stable_rank group={group} target={format_target(target)} "
                       f"of {base_card['variant']} (sha256 {base_card['checksum'][:12]})",
                checksum=weights_checksum(Path(hf_dir)), trust_remote_code=bool(base_card["trust_remote_code"]))
    write_json(card_out, card)
    return card
