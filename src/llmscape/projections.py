"""The decoder's seven weight projections by name, declared once.

A Llama-type decoder block holds four attention projections (``q_proj k_proj v_proj o_proj``) and three
MLP projections (``gate_proj up_proj down_proj``). Spectra stream them, fine-tuning targets them by their
short names (``q`` ... ``down``), interventions and the join group them (``attn``, ``mlp``, ``all``).
Every one of those reads the names from here; the config schema's lists of them are tied to this module
by a test (tests/test_defaults.py). This module imports nothing, so any floor may import it.
"""

from __future__ import annotations

#: short names, in block order: fine-tuning targets and the single-module intervention groups
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
#: the module (and tensor-name) part of each projection in an HF checkpoint, in the same order
DECODER_MODULES = tuple(f"{p}_proj" for p in PROJECTIONS)
ATTENTION_MODULES = DECODER_MODULES[:4]
MLP_MODULES = DECODER_MODULES[4:]
#: module groups aggregated (join) or intervened on (spectra.intervene) besides the single modules
MODULE_GROUPS = {"attn": ATTENTION_MODULES, "mlp": MLP_MODULES, "all": DECODER_MODULES}
#: every group a name may select: each projection by its short name, then the module groups
PROJECTION_GROUPS = {**{p: (m,) for p, m in zip(PROJECTIONS, DECODER_MODULES, strict=True)}, **MODULE_GROUPS}
