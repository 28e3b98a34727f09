"""Does a model fit on the GPUs a job requests? Checked twice, before anything is loaded: when the DAG
is built (from the model's published shape and the device table, ``llmscape.hardware``) and in the job
(from the weights' headers and the memory of the GPUs the job really got).

What an extraction holds on each of its GPUs (``footprint``, ``weights_room``):

* its share of the weights, in the dtype of the extraction (bf16: 2 bytes per parameter);
* its share of the keys and values of every layer for ``extract.token_budget`` tokens (an upper bound
  of what one forward pass with a cache keeps: layers x 2 x kv_heads x head_dim per token);
* the activations of one decoder block for the same tokens (residual, normed input, q, k, v, attention
  output, the MLP's gate, up and product: 4 h + 2 kv_heads x head_dim + 3 f values per token): blocks
  run one after another, but each GPU's allocator keeps what its own blocks used;
* a reserve of ``RESERVE_GB`` for the CUDA context, cuBLAS workspaces and allocator slack;
* one decoder block's worth of weights that cannot be used: accelerate places whole blocks, and keeps
  room for the largest one on the first GPU.

A sharded model runs its layers one GPU after another (accelerate's device map), so the job should hold
the fewest GPUs that fit: ``gpus_needed``. docs/slurm.md gives the choice and its alternatives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import hardware
from .errors import LlmscapeError

GB = 1e9
RESERVE_GB = 2.0
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # auto on a GPU is bf16


class FitError(LlmscapeError, ValueError):
    """GPUs requested that cannot hold the job, or requested in a way the job cannot use; names the keys
    and the fix."""


@dataclass(frozen=True)
class Footprint:
    weights: float       # bytes
    kv: float            # bytes, all layers, token_budget tokens
    activations: float   # bytes, one decoder block, token_budget tokens
    block: float         # bytes of one decoder block's weights

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations


def footprint(cfg: dict, params: float, dtype_bytes: int, token_budget: int) -> Footprint:
    """Memory of an extraction from the model's config.json (``cfg``) and parameter count."""
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    kv = float(token_budget) * L * 2 * kv_heads * hd * dtype_bytes
    act = float(token_budget) * (4 * h + 2 * kv_heads * hd + 3 * f) * dtype_bytes
    block = (2 * h * heads * hd + 2 * h * kv_heads * hd + 3 * h * f + 2 * h) * dtype_bytes
    return Footprint(float(params) * dtype_bytes, kv, act, float(block))


def weights_room(fp: Footprint, totals: list[float]) -> float:
    """Bytes that GPUs of ``totals`` bytes each leave for the weights (module docstring)."""
    return sum(t - RESERVE_GB * GB - fp.activations - fp.block for t in totals) - fp.kv


def gpus_needed(fp: Footprint, memory_bytes: float, most: int = 16) -> int | None:
    """The fewest GPUs of ``memory_bytes`` that hold the extraction (None: not even ``most``)."""
    return next((n for n in range(1, most + 1) if weights_room(fp, [memory_bytes] * n) >= fp.weights), None)


def shard_budget(fp: Footprint, totals: list[float]) -> dict[int, int]:
    """accelerate's ``max_memory`` for a model sharded over GPUs of ``totals`` bytes: each keeps its
    reserve, one block's activations and its share of the keys/values free of weights (accelerate
    would otherwise fill the first GPU to the brim: 77 of 80 GB for Llama-3-70B on two)."""
    free = fp.kv / len(totals) + fp.activations + RESERVE_GB * GB
    return {i: int(t - free) for i, t in enumerate(totals)}


def requested(r: dict) -> tuple[int, str | None]:
    """(GPUs, model name) a rule's resources request: ``gpu`` + ``gpu_model``, or ``gres: gpu[:type]:n``."""
    gres = str(r.get("gres") or "")
    m = re.fullmatch(r"gpu(?::([\w.-]+))?:(\d+)", gres.strip())
    if m:
        return int(m.group(2)), m.group(1)
    return int(r.get("gpu") or 0), r.get("gpu_model")


def requested_gpu(r: dict) -> hardware.Gpu | None:
    """The device-table entry of the GPUs requested: a ``constraint`` naming a known GPU (the way sites
    that share one gres type between memory sizes tell them apart) wins over ``gpu_model``; None when
    neither names a GPU of the table."""
    names = [c for c in re.split(r"[,&|\[\]*\s]+", str(r.get("constraint") or "")) if c]
    names.append(requested(r)[1])
    for name in names:
        if name:
            try:
                return hardware.lookup(name)
            except hardware.HardwareError:
                continue
    return None


def _gb(b: float) -> str:
    return f"{b / GB:.1f} GB"


def check_extract(extract: dict, r: dict, model_cfg: dict | None, params: float | None) -> str | None:
    """DAG-build check of an extraction's GPUs (``extract``: the config section with the schema's defaults
    filled in, ``r``: the rule's resources). Raises FitError for GPUs the job cannot use or that cannot hold
    the model; returns a note for what only the job can check (a GPU or model this machine knows nothing
    about), else None."""
    n, name = requested(r)
    device_map, device = extract.get("device_map"), str(extract["device"])
    if device_map and n == 0 and device != "cpu":
        raise FitError(f"extract.device_map = {device_map!r} shards the model over the job's GPUs, but "
                       "resources.extract.gpu requests none (missing or 0), so the job would get no GPU. Fix: "
                       "request them (resources.extract.gpu: N with resources.extract.gpu_model), or set "
                       "extract.device_map: null for a model that fits one device (extract.device: cpu with a "
                       "device map offloads to disk on purpose).")
    if n == 0 or device == "cpu":
        return None
    if n > 1 and not device_map:
        raise FitError(f"resources.extract.gpu = {n}, but extract.device_map is null: the model is loaded on one "
                       f"GPU and {n - 1} would idle. Fix: resources.extract.gpu: 1, or extract.device_map: auto for "
                       "a model larger than one GPU.")
    gpu = requested_gpu(r)
    if gpu is None or model_cfg is None or params is None:
        what = f"GPU model {name!r}" if gpu is None else "the model's shape"
        return f"extract: {what} unknown here; the job checks that the model fits its GPUs before loading it"
    fp = footprint(model_cfg, params, DTYPE_BYTES.get(str(extract["dtype"]), 2), int(extract["token_budget"]))
    room, fewest = weights_room(fp, [gpu.memory_gb * GB] * n), gpus_needed(fp, gpu.memory_gb * GB)
    if room < fp.weights:
        fix = (f"request resources.extract.gpu: {fewest} (the fewest {gpu.label} that hold it)" if fewest
               else f"{gpu.label} cannot hold it")
        bigger = ", or 80 GB cards (gpu_model: a100_80gb or h100; a bare 'a100' admits 40 GB cards)" \
            if gpu.memory_gb < 80 else ""
        raise FitError(f"resources.extract asks for {n} x {gpu.label} (gpu_model {name!r}, {gpu.memory_gb:.0f} GB "
                       f"each): after {_gb(fp.kv)} of keys/values at extract.token_budget = "
                       f"{extract.get('token_budget')}, and {_gb(fp.activations)} of activations, a "
                       f"{RESERVE_GB:.0f} GB reserve and one {_gb(fp.block)} block per GPU, they leave {_gb(room)} "
                       f"for {_gb(fp.weights)} of weights. Fix: {fix}{bigger}, or a lower extract.token_budget.")
    if device_map and n > fewest:
        return (f"extract: {fewest} x {gpu.label} hold the model; the other {n - fewest} of resources.extract.gpu "
                f"= {n} would idle (sharded layers run one GPU after another). Consider gpu: {fewest}.")
    return None


def deepspeed_stage(path: str | Path, search: list[Path]) -> int:
    """The ZeRO stage of a DeepSpeed JSON, looked up as given, then under each folder of ``search``."""
    for base in [Path("."), *search]:
        f = base / path
        if f.is_file():
            return int(json.loads(f.read_text()).get("zero_optimization", {}).get("stage", 0))
    raise FitError(f"finetune.train.deepspeed = {str(path)!r}: no such file (looked in the working directory and "
                   f"{', '.join(map(str, search))}). Fix: point it at a DeepSpeed JSON such as "
                   "config/deepspeed/zero3.json.")


def check_zero3_launch(train: dict, launch: dict, gpus: int, group: str, search: list[Path]) -> None:
    """ZeRO-3 partitions the model over one process per GPU: more processes than requested GPUs could
    never start (or would share GPUs holding full activations each). CPU runs (gloo) are exempt."""
    n = int(launch["num_processes"])
    if not train.get("deepspeed") or str(train["device"]) == "cpu" or n <= max(gpus, 1):
        return
    if deepspeed_stage(train["deepspeed"], search) != 3:
        return
    raise FitError(f"finetune.train.deepspeed = {train['deepspeed']!r} is ZeRO-3 with finetune.launch.num_processes "
                   f"= {n}, but resources.{group}.gpu requests {gpus or 'no'} GPU(s) (resources.finetune.gpu "
                   f"when {group} does not set it). Fix: resources.finetune.gpu: {n} (one GPU per process), or "
                   f"finetune.launch.num_processes: {max(gpus, 1)}.")
