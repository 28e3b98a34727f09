"""The accelerators a plan or a DAG-build check can reason about: memory and peak dense bf16 rate.

One table, read by the cost model (``llmscape.plan``: expected hours from FLOPs over peak x efficiency)
and by the checks that run when the DAG is built (does the model fit on the GPUs a rule requests?).
Figures are the vendors' data-sheet values for dense bf16 tensor math (no sparsity) and the usable
memory of one card; ``efficiency`` is what a plan assumes when no rehearsal on that device was
measured (``bench/results/scale_<model>_<device>.json``), and is always labelled as assumed.

Sources: NVIDIA A100 data sheet (bf16 312 TFLOPS, 40/80 GB), H100 SXM data sheet (bf16 989 TFLOPS
dense, 80 GB), H200 data sheet (bf16 989 TFLOPS dense, 141 GB), L40S data sheet (bf16 362 TFLOPS
dense, 48 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LlmscapeError


class HardwareError(LlmscapeError, ValueError):
    pass


@dataclass(frozen=True)
class Gpu:
    name: str            # the key used in configs and rehearsal files
    label: str           # what a person calls it
    memory_gb: float     # usable memory of one card, GB (1e9 bytes)
    bf16_tflops: float   # peak dense bf16 tensor rate, TFLOP/s
    bandwidth_tbs: float  # memory bandwidth, TB/s


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100-40", "NVIDIA A100 40GB", 40.0, 312.0, 1.555),
    Gpu("a100-80", "NVIDIA A100 80GB", 80.0, 312.0, 2.039),
    Gpu("h100", "NVIDIA H100 80GB (SXM)", 80.0, 989.0, 3.35),
    Gpu("h200", "NVIDIA H200 (141 GB)", 141.0, 989.0, 4.8),
    Gpu("l40s", "NVIDIA L40S 48GB", 48.0, 362.0, 0.864),
)}

# Slurm gpu_model / gres type names as clusters commonly spell them, mapped onto the table. A bare
# "a100" admits both memory sizes, so a check that needs memory takes the smaller one.
ALIASES = {
    "a100": "a100-40", "a100_40gb": "a100-40", "a100-40gb": "a100-40", "a100_40g": "a100-40",
    "a100_80gb": "a100-80", "a100-80gb": "a100-80", "a100_80g": "a100-80", "a100-sxm4-80gb": "a100-80",
    "h100_80gb": "h100", "h100-80gb": "h100", "h100-sxm": "h100",
    "h200_141gb": "h200", "h200-141gb": "h200",
    "l40s_48gb": "l40s",
}


def lookup(name: str) -> Gpu:
    """The table's entry for a config's or a device's GPU name (case and punctuation tolerant)."""
    key = str(name).strip().lower().replace(" ", "")
    key = ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    raise HardwareError(f"unknown GPU model {name!r}. Fix: one of {', '.join(GPUS)} "
                        f"(or an alias: {', '.join(sorted(ALIASES))})")


def from_device_name(name: str, memory_gb: float | None = None) -> Gpu | None:
    """The table's entry for what ``torch.cuda.get_device_properties(0).name`` reports, or None."""
    n = name.lower()
    for key, fam in (("h200", "h200"), ("h100", "h100"), ("l40s", "l40s")):
        if key in n:
            return GPUS[fam]
    if "a100" in n:
        big = "80gb" in n or (memory_gb is not None and memory_gb > 45)
        return GPUS["a100-80" if big else "a100-40"]
    return None
