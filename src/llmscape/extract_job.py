"""An extraction job: one or several shot counts of one (model, variant), the weights read once.

On a cluster a job per (variant, shots) spends a good part of its minutes starting up and reading the
weights; with ``extract.one_job_per_variant`` one job writes every shot count of a variant. Snakemake
deletes every output of a failed job before its retry, so a file finished before the failure would be
lost with it: each finished file gets a hidden second name (a hard link, no extra disk) that the retry
takes back when its fingerprint (weights, questions, settings, template) still matches; a job that
succeeds removes the second names, so a forced rerun recomputes everything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import pandas as pd
import torch

from .extract import ExtractConfig, extract, fingerprint, load_model

log = logging.getLogger(__name__)


def kept_name(path: str | Path) -> Path:
    """The hidden second name of a finished output: ``.0shot.h5.kept`` next to ``0shot.h5``."""
    path = Path(path)
    return path.with_name(f".{path.name}.kept")


def take_back(h5: Path, accuracy: Path, fp: str) -> bool:
    """Restore a file finished by an earlier attempt of this job if its fingerprint matches."""
    kept_h5, kept_acc = kept_name(h5), kept_name(accuracy)
    if not (kept_h5.exists() and kept_acc.exists()):
        return False
    try:
        with h5py.File(kept_h5, "r") as f:
            ok = bool(f.attrs.get("complete")) and f.attrs.get("fingerprint") == fp
    except OSError:
        ok = False
    if not ok:
        log.info("%s is from other settings or damaged; extracting again", kept_h5)
        drop_kept([h5, accuracy])
        return False
    for kept, out in ((kept_h5, h5), (kept_acc, accuracy)):
        out.unlink(missing_ok=True)
        os.link(kept, out)
        os.utime(out)  # newer than the inputs, as a fresh output
    log.info("%s: finished by an earlier attempt of this job, taken back", h5)
    return True


def keep(paths: Sequence[Path]) -> None:
    for p in paths:
        kept_name(p).unlink(missing_ok=True)
        os.link(p, kept_name(p))


def drop_kept(paths: Sequence[Path]) -> None:
    for p in paths:
        kept_name(p).unlink(missing_ok=True)


def run(card: dict, rows: pd.DataFrame, pool: pd.DataFrame, params: dict, shots: Sequence[int],
        h5s: Sequence[str | Path], accuracies: Sequence[str | Path], *, seed: int, threads: int | None = None) -> None:
    """Extract ``shots[i]`` into ``h5s[i]`` and ``accuracies[i]``, loading the model once."""
    if not len(shots) == len(h5s) == len(accuracies):
        raise ValueError("one HDF5 file and one accuracy file per shot count")
    cfgs = [ExtractConfig.from_dict(dict(params), shots=k) for k in shots]
    qids = rows.sort_values("question_id").question_id.to_numpy()
    several = len(shots) > 1
    tok = model = None
    # the most shots first: a prompt past the model's context is refused before any file is written
    work = sorted(zip(cfgs, map(Path, h5s), map(Path, accuracies), strict=True), key=lambda w: -w[0].shots)
    for cfg, h5, acc in work:
        if several and take_back(h5, acc, fingerprint(card["checksum"], qids, cfg, seed)):
            continue
        if model is None:
            if threads:
                torch.set_num_threads(int(threads))
            tok, model = load_model(card, cfg)
        log.info("%d analysis questions, %d-shot, site %s, order %s, prefix sharing %s",
                 len(rows), cfg.shots, cfg.site, cfg.shot_order, cfg.shares_prefix)
        extract(card, rows, pool, cfg, h5, acc, seed=seed, threads=threads, model=model, tok=tok)
        if several:
            keep([h5, acc])
    if several:
        drop_kept([Path(p) for p in list(h5s) + list(accuracies)])
