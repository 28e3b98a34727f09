"""Fine-tuning sweeps: six PEFT methods, one small package each, trained through accelerate.

    lora/              peft LoRA on configurable targets
    lora_adaptive/     peft LoRA with per-module ranks from the spectra stage (methods.md E.2)
    attn_qv/           q and v only, value lr = lambda x query lr (methods.md D)
    spectral_a/        Spectral^A: additive tuning of the top-r singular vectors (methods.md C.1)
    spectral_r/        Spectral^R: Cayley rotations of the top-r singular vectors (methods.md C.2)
    srank_calibrated/  LoRA on matrices chosen by stable rank: our reconstruction (methods.md B.3)

``registry`` maps names to packages, ``grid`` expands and validates the config sweep, ``data`` builds the
answer-letter SFT examples, ``train`` runs one job, ``merge`` writes merged weights and model cards,
``evaluate`` scores MMLU letters as extraction does.
"""

from .common import Context, FinetuneError, RunSpec  # noqa: F401
from .registry import METHODS, get  # noqa: F401
