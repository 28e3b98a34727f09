"""Atomic output helpers: every output is written under a temporary name and renamed when complete,
so a killed job never leaves a half-written file behind; and readers of the pipeline's own tables and
arrays that name a damaged file and the command that rebuilds it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LlmscapeError, rebuild_command


class OutputError(LlmscapeError, RuntimeError):
    pass


class DamagedFileError(LlmscapeError, ValueError):
    """A file the pipeline wrote cannot be read back (truncated, overwritten): named with its rebuild."""


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


# how HDF5 reports a failed write (h5py raises it as text), and how Rust's I/O errors read (safetensors)
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|\(os error (\d+)\)")
_FILE_IN_TEXT = re.compile(r"(?:filename|name) = '([^']+)'")


def no_room(exc: BaseException, outputs=()) -> str | None:
    """One line for an error that says the disk is full or a folder is not writable, naming the folder
    and the fix; None for any other error. Read from an OSError's errno or, as h5py reports HDF5's
    failed writes, from "errno = N" (or, as safetensors reports them, "(os error N)") in the text of the
    error or of one it was raised while handling.
    ``outputs``: the job's output files, whose folder is named when the error names no file."""
    seen = exc
    while seen is not None:
        text = str(seen)
        match = _ERRNO_IN_TEXT.search(text)
        code = seen.errno if isinstance(seen, OSError) and seen.errno else \
            int(match.group(1) or match.group(2)) if match else None
        if code in _NO_ROOM:
            found = _FILE_IN_TEXT.search(text)
            name = getattr(seen, "filename", None) or (found.group(1) if found else None)
            folder = Path(name).parent if name else Path(list(outputs)[0]).parent if outputs else Path.cwd()
            return _room_line(code, folder.resolve())
        seen = seen.__cause__ or seen.__context__
    return None


def _room_line(code: int, folder: Path) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"{os.strerror(code)} in {folder}. Fix: free space there (`df -h {folder}` shows what is left) or run "
                "the workflow where there is room; then rerun (an extraction resumes its .partial file).")
    if code == errno.EROFS:
        return (f"{os.strerror(code)}: {folder} cannot be written. Fix: make it writable (`ls -ld {folder}`), or run "
                "the workflow from a writable folder.")
    return (f"{os.strerror(code)} in {folder} (this job's user may not write, or read, there). Fix: give it access "
            f"(`ls -ld {folder}`), or run the workflow from a folder it may write.")


def _nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor (the folder a job would create it in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _why_not_writable(folder: Path) -> str:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "a read-only file system" if read_only else "no write permission for this user"


def _listed(paths, limit: int = 5) -> str:
    paths = sorted(set(map(str, paths)))
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def unwritable_outputs(paths) -> str | None:
    """Checked after the DAG is built and before any job runs, on the outputs and logs of the jobs about
    to run: the folders they go to that cannot be written (a chmod'ed or read-only results folder, where
    every job would fail at its first write). One message naming them, why, and the fix; None when all
    can be written. (An existing output that is write-protected never gets here: Snakemake refuses it
    while building the DAG; :func:`unwritable_under` warns about it before.)"""
    folders = {}
    for p in map(Path, paths):
        folder = _nearest_existing(p.parent)
        if folder not in folders:
            folders[folder] = None if os.access(folder, os.W_OK | os.X_OK) else _why_not_writable(folder)
    blocked = {f: why for f, why in folders.items() if why}
    if not blocked:
        return None
    where = "; ".join(f"{f} ({why})" for f, why in sorted(blocked.items())[:5])
    return (f"Nothing was run: the jobs to run write into folders that cannot be written: {where}"
            + (f" and {len(blocked) - 5} more" if len(blocked) > 5 else "")
            + f". Fix: make them writable (`chmod -R u+w {_listed(blocked)}`, or remount the file system "
            "read-write), or run the workflow from a writable copy of the checkout.")


def unwritable_under(root: str | os.PathLike) -> str | None:
    """Checked when the workflow is read, before Snakemake builds the DAG (where it stops at the first
    write-protected output it must rebuild, with a bare ProtectedOutputException): the folders under
    ``root`` that cannot be written (the top one of each such subtree) and the write-protected files in
    the others. One warning naming them, why, and the fix; None when all can be written (or no ``root``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    folders, files = [], []
    for here, subdirs, names in os.walk(root):
        if not os.access(here, os.W_OK | os.X_OK):
            folders.append(Path(here))
            subdirs[:] = []  # everything below it is blocked too
            continue
        files += [Path(here, n) for n in names if not os.path.islink(Path(here, n))
                  and not os.access(Path(here, n), os.W_OK)]
    if not folders and not files:
        return None
    said = []
    if folders:
        said.append(f"folders that cannot be written: {'; '.join(f'{f} ({_why_not_writable(f)})' for f in folders[:5])}"
                    + (f" and {len(folders) - 5} more" if len(folders) > 5 else ""))
    if files:
        said.append(f"{len(files)} write-protected file(s): {_listed(files)}")
    return (f"{root} holds {' and '.join(said)}. A job that must write there fails (Snakemake stops with "
            "ProtectedOutputException where it must rebuild a protected output). Fix: if they are to be rebuilt, "
            f"make them writable (`chmod -R u+w {_listed(folders + files)}`, or remount the file system "
            "read-write); if they are kept on purpose, nothing.")


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
    except Exception as e:
        line = no_room(e, [dest])  # one line naming the folder, whichever library was writing
        if line:
            raise OutputError(f"cannot write {dest}: {line}") from None
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
    from io import BytesIO

    buf = BytesIO()  # np.save into a file reports a short write without its errno (a full disk unnamed)
    np.save(buf, arr)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buf.getvalue())


def rebuild_hint(path: str | os.PathLike) -> str:
    """The command that rebuilds exactly ``path`` (the job that writes it, not its whole rule)."""
    return (f"Fix: rebuild it with `{rebuild_command(path)}` (with your run's --configfile and --profile), "
            "then run the workflow as before: what was made from it is redone.")


def _damaged(path, kind: str, e: BaseException) -> DamagedFileError:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DamagedFileError(f"{path} cannot be read as {kind} ({why}): it is truncated or damaged. "
                            f"{rebuild_hint(path)}")


def read_parquet(path: str | os.PathLike, **kw):
    """pandas.read_parquet, with a damaged file named (pyarrow's own error does not say which file)."""
    import pandas as pd
    from pyarrow.lib import ArrowException

    try:
        return pd.read_parquet(path, **kw)
    except FileNotFoundError:
        raise
    except (ArrowException, OSError, ValueError, EOFError) as e:
        raise _damaged(path, "a parquet table", e) from None


def read_npz(path: str | os.PathLike, keys=None) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive, read in full here (so a damaged member fails here, named): every
    member, or those of ``keys`` that the archive holds (a caller that needs two small members of a large
    archive reads only those)."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if keys is None or k in keys}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError) as e:
        raise _damaged(path, "an .npz archive", e) from None


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """One .npy array (an index file), with a damaged file named."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise _damaged(path, "an .npy array", e) from None


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file the pipeline wrote (a run's metrics, an intervention's record), with a truncated or
    overwritten file named with its rebuild instead of the decoder's bare position."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, "JSON", e) from None


def read_csv(path: str | os.PathLike, **kw):
    """A CSV table the pipeline wrote, with an empty or malformed file named with its rebuild."""
    import pandas as pd

    try:
        return pd.read_csv(path, **kw)
    except FileNotFoundError:
        raise
    except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError, OSError) as e:
        raise _damaged(path, "a CSV table", e) from None


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
