"""The device and dtype every stage runs on: one helper, each stage naming its own config key."""

from __future__ import annotations

import re

from .errors import LlmscapeError


class DeviceError(LlmscapeError, ValueError):
    """A device or dtype the machine cannot give; the message names the config key and the fix."""


#: what a device key may say: auto (CUDA when present, else CPU), cpu, cuda, cuda:N (one GPU of the node)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_KEYS = ("extract.device", "spectra.device", "geometry.device")


def check_device(device, key: str = "extract.device", error: type[Exception] | None = None) -> str:
    """``device`` if it is one a stage can run on (:data:`DEVICE`), else an error naming ``key`` and the
    fix (torch's own answer to ``gpu`` is its list of twenty device types, none of which is meant)."""
    if isinstance(device, str) and DEVICE.fullmatch(device):
        return device
    near = " (cuda is the GPU)" if str(device).lower() in ("gpu", "gpus", "nvidia", "cuda0") else ""
    raise (error or DeviceError)(f"{key} = {device!r} is not a device llmscape runs on{near}. Fix: set {key} to "
                                 "auto (CUDA when present, else the CPU), cpu, cuda, or cuda:N for one GPU.")


def pick_device(device: str = "auto", key: str = "extract.device", error: type[Exception] = None) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; a device that is not one (``gpu``), or a CUDA
    device without a GPU, is an error naming the config ``key`` (raised as ``error``, DeviceError by
    default). Shared by every stage."""
    import torch

    check_device(device, key, error)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise (error or DeviceError)(f"{key} {device!r} asked for, but torch sees no CUDA GPU. "
                                    f"Fix: set {key} to auto or cpu.")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise DeviceError(f"dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]
