"""Fine-tuning sweeps: six PEFT methods, one small package each, trained through accelerate.

    lora/              peft LoRA on configurable targets
    lora_adaptive/     peft LoRA with per-module ranks from the spectra stage (Adaptive-Rank LoRA)
    attn_qv/           q and v only, value lr = lambda x query lr (Yao et al., IJCAI 2025)
    spectral_a/        Spectral^A: additive tuning of the top-r singular vectors (Zhang & Pilanci 2024)
    spectral_r/        Spectral^R: Cayley rotations of the top-r singular vectors (Zhang & Pilanci 2024)
    srank_calibrated/  LoRA on matrices chosen by stable rank: our reconstruction of Liu et al. 2024

``method`` is the contract a method folder fulfils, ``registry`` finds the folders and maps names to
them, ``grid`` expands and validates the config sweep, ``data`` builds the answer-letter SFT examples,
``train`` runs one job, ``launch`` starts it in one process or several, ``merge`` writes the adapters,
merged weights and model cards (the adapter format itself is ``llmscape.adapters``), ``evaluate``
scores MMLU letters as extraction does.
"""

from .common import Context, FinetuneError, RunSpec
from .registry import METHODS, get

__all__ = ["METHODS", "Context", "FinetuneError", "RunSpec", "get"]
