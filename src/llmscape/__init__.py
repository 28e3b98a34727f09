"""llmscape: representation geometry and weight spectra of causal LMs on MMLU.

Modules: data (MMLU sources and splits), prompts (the lm-eval MMLU template), models (preparation and
loading), extract (per-layer last-token states to HDF5), geometry, spectra, finetune, join.
"""

__version__ = "0.1.0"
