"""Reading extractions and the saved neighbour lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..integrity import check_identity, rebuild_hint, verify
from .params import GeometryError


def read_layer(hidden, layer: int, h5_path: str | Path):
    """One layer of ``hidden``, with a clear error when its checksums or its bytes are damaged."""
    try:
        return hidden[layer]
    except OSError as e:
        raise GeometryError(f"{h5_path}: layer {layer} cannot be read intact ({e}); the file is damaged "
                            f"(a failed checksum or missing data), so nothing is computed from it. "
                            f"{rebuild_hint(h5_path)}") from None


def open_checked(h5_path: str | Path, required=(), *, model: str | None = None, variant: str | None = None,
                 shots: int | None = None):
    """The extraction at ``h5_path`` opened for reading, after the checks every reader makes: readable,
    marked complete, holding the datasets ``required``, every dataset matching its checksum (``hidden``'s
    chunks are checked by HDF5 as they are read), and its attributes agreeing with the ``model``,
    ``variant`` and ``shots`` its path names (None: not compared). Each refusal names the file and the
    command that rebuilds it."""
    import h5py

    h5_path = Path(h5_path)
    if not h5_path.exists():
        raise GeometryError(f"no extraction at {h5_path}")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise GeometryError(f"{h5_path} is not a readable HDF5 file ({e}): truncated or corrupt. "
                            f"{rebuild_hint(h5_path)}") from None
    try:
        if not f.attrs.get("complete", False):
            raise GeometryError(f"{h5_path} has no completion mark: its extraction was cut short (or written by an "
                                f"llmscape without the mark). {rebuild_hint(h5_path)}")
        missing = [k for k in required if k not in f]
        if missing:
            raise GeometryError(f"{h5_path} lacks datasets {missing}: not an llmscape extraction. "
                                f"{rebuild_hint(h5_path)}")
        verify(f, h5_path, GeometryError)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        check_identity(h5_path, attrs, model=model, variant=variant, shots=shots, error=GeometryError)
    except BaseException:
        f.close()
        raise
    return f


def read_datasets(h5_path: str | Path, names, **path_names) -> dict:
    """The datasets ``names`` of a checked extraction (:func:`open_checked`), as arrays (strings as str)."""
    with open_checked(h5_path, names, **path_names) as f:
        return {k: (f[k].asstr()[()] if f[k].dtype.kind == "O" else f[k][()]) for k in names}


def read_labels(h5_path: str | Path, *, model: str | None = None, variant: str | None = None,
                shots: int | None = None) -> dict:
    """question_id, subject codes and names, answer letters and layer names of an extraction; an
    unreadable, truncated, incomplete or damaged file, or one whose attributes disagree with the
    ``model``, ``variant`` and ``shots`` its path names, is an error naming it and the command that
    rebuilds it (:func:`open_checked`)."""
    h5_path = Path(h5_path)
    required = ("hidden", "question_id", "subject", "answer")
    with open_checked(h5_path, required, model=model, variant=variant, shots=shots) as f:
        shape = f["hidden"].shape
        if len(shape) != 3:
            raise GeometryError(f"{h5_path}: hidden has shape {shape}, expected (n_layers, n_questions, d)")
        qid = np.asarray(f["question_id"][:], dtype=np.int64)
        subject = np.asarray(f["subject"].asstr()[:], dtype=object)
        answer = np.asarray(f["answer"][:], dtype=np.int64)
        if "layer_name" in f:
            layer_name = [str(s) for s in f["layer_name"].asstr()[:]]
        else:
            layer_name = [f"l{i}" for i in range(shape[0])]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    n = shape[1]
    for key, arr in (("question_id", qid), ("subject", subject), ("answer", answer)):
        if arr.shape != (n,):
            raise GeometryError(f"{h5_path}: {key} has shape {arr.shape}, hidden has {n} questions")
    if len(layer_name) != shape[0]:
        raise GeometryError(f"{h5_path}: {len(layer_name)} layer names for {shape[0]} layers")
    if n < 2:
        raise GeometryError(f"{h5_path}: {n} question(s); geometry needs many")
    if answer.size and (answer.min() < 0 or answer.max() > 3):
        raise GeometryError(f"{h5_path}: answer letters outside 0..3 ({sorted(set(answer.tolist()))[:8]}): not "
                            f"an llmscape extraction. {rebuild_hint(h5_path)}")
    subject_names, subject_codes = np.unique(subject.astype(str), return_inverse=True)
    return dict(question_id=qid, subject=subject_codes.astype(np.int64), subject_names=subject_names,
                answer=answer, layer_name=layer_name, shape=shape, attrs=attrs)



def write_knn(dest: str | Path, knn: dict) -> None:
    from ..io import atomic_path

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **knn)


def read_knn(path: str | Path) -> dict:
    """The saved neighbour lists; a damaged archive is an error naming it and the command that rebuilds it."""
    from ..io import read_npz

    return read_npz(path)
