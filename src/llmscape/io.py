"""Atomic output helpers: every output is written under a temporary name and renamed when complete,
so a killed job never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from .errors import LlmscapeError


class OutputError(LlmscapeError, RuntimeError):
    pass


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def ensure_writable(path: str | os.PathLike) -> Path:
    """Create the parent folder of ``path`` and check it is writable; fail early with the fix."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {parent}: {e}. Fix: choose a writable "
                          "results location (run from a writable checkout or fix permissions).") from e
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable. Fix: fix its permissions or run "
                          "the workflow from a writable directory.")
    return path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds."""
    dest = ensure_writable(dest)
    tmp = dest.with_name(f".{dest.name}{suffix}")
    if tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as e:
        if e.errno in _NO_ROOM:  # one line naming the folder, whichever library was writing
            raise OutputError(f"cannot write {dest}: {os.strerror(e.errno)} in {dest.parent}. Fix: "
                              + ("free space there or point the results elsewhere (run from another folder)."
                                 if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                                 "make the folder writable or run the workflow from a writable folder.")) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; it replaces ``dest`` (a folder of a model's
    weights, an adapter) only if the block succeeds, and is removed if it fails."""
    import shutil

    dest = ensure_writable(dest)
    tmp = dest.with_name(tmp_name or f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(dest: str | os.PathLike, df) -> None:
    with atomic_path(dest) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(dest: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def package_versions(names=("llmscape", "torch", "transformers", "numpy", "h5py", "peft", "accelerate",
                            "dadapy", "scikit-learn", "snakemake")) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out
