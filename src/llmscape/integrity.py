"""Checks that an extraction file is whole and is the one its path names, before anything reads it.

An extraction (``results/reps/{model}/{variant}/{shots}shot.h5``, see :mod:`llmscape.extract`) is read
by geometry, the resolution study, the paired accuracy test and the benchmarks. Each of its datasets is
covered by a checksum: ``hidden`` by HDF5's per-chunk fletcher32 (checked by HDF5 on every read, so a
layer is checked when it is read, not all at once), every other dataset (labels, predictions, logits,
token counts, layer names) by a sha256 of its values stored in the dataset's ``sha256`` attribute,
written by :func:`seal` when the extraction is finished and compared by :func:`verify` on every read.
A damaged file is refused naming the file, the dataset and the command that rebuilds exactly this file
(:func:`llmscape.io.rebuild_command`). :func:`check_identity` refuses a file whose own attributes (model, variant,
shots, prompt template) disagree with the path it was read under (a file copied over another).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import LlmscapeError
from .io import rebuild_command

#: attribute of every dataset but ``hidden``: sha256 of its dtype, shape and values (:func:`dataset_digest`)
DIGEST_ATTR = "sha256"
#: the dataset whose chunks carry fletcher32 checksums instead (too large to hash as a whole on every read)
CHUNKED = "hidden"


class DamagedExtraction(LlmscapeError, OSError):
    """An extraction that is damaged, unsealed, or not the one its path names."""


def rebuild_hint(h5_path: str | Path) -> str:
    """The fix sentence every refusal of an extraction ends with."""
    return (f"Fix: rebuild exactly this file with `{rebuild_command(h5_path)}` (add the --configfile and "
            f"--profile of your run), then run the workflow as before: what was made from it is redone.")


def dataset_digest(ds) -> str:
    """sha256 of an h5py dataset's dtype, shape and values; strings as their utf-8 bytes, each prefixed
    by its length (so ["ab", "c"] and ["a", "bc"] differ)."""
    import h5py

    h = hashlib.sha256()
    is_str = h5py.check_string_dtype(ds.dtype) is not None
    h.update(f"{'str' if is_str else np.dtype(ds.dtype).str}|{tuple(ds.shape)}|".encode())
    if is_str:
        for s in np.ravel(ds.asstr()[()]):
            b = str(s).encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(np.ascontiguousarray(ds[()]).tobytes())
    return h.hexdigest()


def seal(f, skip: Iterable[str] = ()) -> None:
    """Store the digest of every dataset of the open, writable file ``f`` but ``hidden`` (and ``skip``),
    as read back from the file. Called when an extraction is finished, before its completion mark."""
    if CHUNKED in f and not f[CHUNKED].fletcher32:
        raise DamagedExtraction(f"{f.filename}: {CHUNKED} was written without fletcher32 checksums")
    for name, ds in f.items():
        if name != CHUNKED and name not in skip:
            ds.attrs[DIGEST_ATTR] = dataset_digest(ds)


def verify(f, h5_path: str | Path, error: type[Exception] = DamagedExtraction) -> None:
    """Refuse (``error``) an open extraction any of whose datasets is not covered by its checksum or
    does not match it, naming the file, the dataset and the rebuild command."""
    if CHUNKED in f and not f[CHUNKED].fletcher32:
        raise error(f"{h5_path}: {CHUNKED} has no per-chunk checksums, so damage in it would go unseen. "
                    f"{rebuild_hint(h5_path)}")
    for name in f:
        if name == CHUNKED:
            continue
        try:
            ds = f[name]
            stored = ds.attrs.get(DIGEST_ATTR)
            got = dataset_digest(ds) if stored is not None else None
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise error(f"{h5_path}: dataset {name!r} cannot be read intact ({e}): the file is damaged, so "
                        f"nothing is computed from it. {rebuild_hint(h5_path)}") from None
        if stored is None:
            raise error(f"{h5_path}: dataset {name!r} has no checksum (written by an llmscape that did not "
                        f"checksum every dataset, or its attributes are damaged). {rebuild_hint(h5_path)}")
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        if got != stored:
            raise error(f"{h5_path}: dataset {name!r} does not match its checksum (stored sha256 {stored[:12]}, "
                        f"read {got[:12]}): the file is damaged, so nothing is computed from it. "
                        f"{rebuild_hint(h5_path)}")


def _model_names(attrs: dict) -> set[str]:
    """The names a file's model may appear under in a path: its label, its id, the id's last part."""
    names = {str(attrs.get(k, "")) for k in ("label", "model")}
    names.add(Path(str(attrs.get("model", "")).rstrip("/")).name)
    return names - {""}


def check_identity(h5_path: str | Path, attrs: dict, *, model: str | None = None, variant: str | None = None,
                   shots: int | None = None, error: type[Exception] = DamagedExtraction) -> None:
    """Refuse (``error``) an extraction whose attributes disagree with what its path names (``model``,
    ``variant``, ``shots``: the workflow's wildcards; None or "" is not compared) or whose prompts were
    built from another template than this llmscape's."""
    from .prompts import template_hash

    wrong = []
    if model and model not in _model_names(attrs):
        wrong.append(f"model {attrs.get('label') or attrs.get('model')!r} (path: {model!r})")
    if variant and str(attrs.get("variant", "")) != str(variant):
        wrong.append(f"variant {attrs.get('variant')!r} (path: {variant!r})")
    if shots is not None and int(shots) >= 0 and _int(attrs.get("shots")) != int(shots):
        wrong.append(f"shots {attrs.get('shots')!r} (path: {int(shots)})")
    if wrong:
        raise error(f"{h5_path} is not the extraction its path names: its attributes say {', '.join(wrong)}. "
                    f"A file copied or moved over another would be analysed under the wrong name. "
                    f"{rebuild_hint(h5_path)}")
    have = attrs.get("template_hash")
    if have is not None and str(have) != template_hash():
        raise error(f"{h5_path} was extracted from prompts of another template (template_hash {have}, this "
                    f"llmscape builds {template_hash()}): its states are not of the prompts analysed now. "
                    f"{rebuild_hint(h5_path)}")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
