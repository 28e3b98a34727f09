#!/usr/bin/env python3
"""Compare two runs of the same DAG (a local one and one with the image's software): their results must be
equal. Usage: ``image_check.py LOCAL_DIR IMAGE_DIR`` (the two working directories, each with ``results/``).

What must be equal (exit 1 otherwise):
  * the set of files under ``results/``;
  * HDF5: every dataset (values, dtype, shape) and every attribute;
  * parquet and CSV tables: columns, dtypes and values, apart from timing columns;
  * npy/npz arrays; safetensors tensors and their metadata;
  * JSON: every value, apart from timing and peak-memory keys.
Timing means wall time, seconds, rates and peak memory: they measure the run, not its result. Figures and
other files are compared byte for byte and only reported; TensorBoard's event logs (under ``tb/``, named
and stamped with wall-clock times) are left out. The comparison is exact (NaN equal to NaN): the same pinned
wheels on the same CPU give the same floating-point operations.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

TIMING = re.compile(r"seconds|time_s$|per_s$|wall|elapsed|peak_memory")


def same_array(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def h5_items(path: Path) -> dict:
    """Every dataset's values and every attribute (of the file, groups and datasets), by name."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[f"dataset {name}"] = obj[()]
            for key, value in obj.attrs.items():
                out[f"attr {name}:{key}"] = value
        for key, value in f.attrs.items():
            out[f"attr /:{key}"] = value
        f.visititems(visit)
    return out


def diff_h5(a: Path, b: Path) -> list[str]:
    x, y = h5_items(a), h5_items(b)
    bad = [f"{k} only in one run" for k in sorted(set(x) ^ set(y))]
    return bad + [f"{k} differs" for k in sorted(set(x) & set(y)) if not same_array(x[k], y[k])]


def diff_frames(x: pd.DataFrame, y: pd.DataFrame) -> list[str]:
    if list(x.columns) != list(y.columns):
        return [f"columns differ: {sorted(set(x.columns) ^ set(y.columns))}"]
    keep = [c for c in x.columns if not TIMING.search(str(c))]
    try:
        pd.testing.assert_frame_equal(x[keep], y[keep], check_exact=True)
    except AssertionError as e:
        return [str(e).replace("\n", " ")[:300]]
    return []


def diff_npz(a: Path, b: Path) -> list[str]:
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        if sorted(x.files) != sorted(y.files):
            return [f"arrays differ: {sorted(set(x.files) ^ set(y.files))}"]
        return [f"array {k} differs" for k in x.files if not same_array(x[k], y[k])]


def diff_safetensors(a: Path, b: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(a, "numpy") as x, safe_open(b, "numpy") as y:
        if x.metadata() != y.metadata() or sorted(x.keys()) != sorted(y.keys()):
            return ["metadata or tensor names differ"]
        return [f"tensor {k} differs" for k in x.keys() if not same_array(x.get_tensor(k), y.get_tensor(k))]


def strip_timing(obj):
    """The JSON value without its timing keys, at any depth."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def diff_json(a: Path, b: Path) -> list[str]:
    x, y = (strip_timing(json.loads(p.read_text())) for p in (a, b))
    # NaN is not equal to itself in Python: compare the canonical text
    return [] if json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True) else ["values differ"]


CHECKS = {
    ".h5": diff_h5,
    ".parquet": lambda a, b: diff_frames(pd.read_parquet(a), pd.read_parquet(b)),
    ".csv": lambda a, b: diff_frames(pd.read_csv(a), pd.read_csv(b)),
    ".npy": lambda a, b: [] if same_array(np.load(a), np.load(b)) else ["array differs"],
    ".npz": diff_npz,
    ".safetensors": diff_safetensors,
    ".json": diff_json,
}


def result_files(run: Path) -> set[Path]:
    """The files under ``results/``, less TensorBoard's event logs: their names hold the wall-clock
    time, the host and the process id."""
    return {p.relative_to(run) for p in (run / "results").rglob("*")
            if p.is_file() and "tb" not in p.relative_to(run).parts[:-1]}


def compare(local: Path, image: Path) -> tuple[list[str], list[str], int]:
    """(differences that fail, files only reported as differing, number of files checked)."""
    files, other = result_files(local), result_files(image)
    failures = [f"{p}: only in the local run" for p in sorted(files - other)]
    failures += [f"{p}: only in the image run" for p in sorted(other - files)]
    reported, checked = [], 0
    for rel in sorted(files & other):
        check = CHECKS.get(rel.suffix)
        if check is None:
            if (local / rel).read_bytes() != (image / rel).read_bytes():
                reported.append(str(rel))
            continue
        checked += 1
        failures += [f"{rel}: {d}" for d in check(local / rel, image / rel)]
    return failures, reported, checked


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all((Path(d) / "results").is_dir() for d in argv):
        print("usage: image_check.py LOCAL_DIR IMAGE_DIR (each a working directory holding results/)",
              file=sys.stderr)
        return 2
    failures, reported, checked = compare(Path(argv[0]), Path(argv[1]))
    print(f"[image-check] {checked} result files compared (HDF5, tables, arrays, tensors, JSON)")
    if reported:
        print(f"[image-check] {len(reported)} other files differ byte for byte (figures and the like; "
              f"not required to be equal): {', '.join(reported[:8])}{' ...' if len(reported) > 8 else ''}")
    for line in failures:
        print(f"[image-check] DIFFERS {line}")
    print("[image-check] " + ("the two runs' results are equal" if not failures else f"{len(failures)} differences"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
