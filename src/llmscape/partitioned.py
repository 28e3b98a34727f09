"""Reads of parameters that DeepSpeed ZeRO-3 may have partitioned across processes.

Under ZeRO stage 3 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", SC 2020; DeepSpeed's ``zero.Init`` and ``zero.GatheredParameters``), each process keeps only a
slice of every parameter that is not small enough to persist (``stage3_param_persistence_threshold``):
``param.data`` is an empty tensor, the real shape and size are in ``ds_shape`` / ``ds_numel``, and the
whole tensor exists only while it is gathered. A module's forward gathers its own parameters through
hooks; any other read of a weight (an index into the LM head, an SVD, saving a tensor) must gather it
first. Gathering is a collective: every process must enter it, in the same order.

Nothing here imports DeepSpeed unless a parameter really is partitioned (DeepSpeed marks those with
``ds_id``), so the functions are no-ops, and free, for every other model. This module sits at the bottom
of the package (it imports nothing from it), so extraction, fine-tuning and spectra can all use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


def is_partitioned(param) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 manages (it may be an empty slice outside a gather)."""
    return param is not None and hasattr(param, "ds_id")


def full_numel(param) -> int:
    """The element count of the whole tensor, also while ZeRO-3 holds only a slice of it."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_ndim(param) -> int:
    """The number of dimensions of the whole tensor (a ZeRO-3 slice is 1-D whatever the matrix is)."""
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


@contextlib.contextmanager
def gathered(params: Iterable, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside this block the ZeRO-3 partitioned ones among ``params`` are whole on every process (they
    are partitioned again on exit). A no-op without partitioned parameters. With ``modifier_rank``
    set, what that process writes into them is kept (DeepSpeed broadcasts it on exit); with ``None``,
    reads only. Every process must enter the block (a collective)."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield
