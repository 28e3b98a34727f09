"""Fine-tuning method attn-qv: its own properties (the shared training path is in test_finetune.py)."""
import pytest

from finetune_kit import load, run_of
from llmscape.finetune import registry


def test_attn_qv_value_group_gets_lambda_lr(tiny_dir):
    for mode in ("lora", "full"):
        run = run_of("attn-qv", lr=1e-3, ratio=4.0, mode=mode)
        model = registry.get("attn-qv").apply(load(tiny_dir), run).model
        groups = {g["name"]: g for g in registry.param_groups(model, run)}
        assert set(groups) == {"query", "value"}
        assert groups["value"]["lr"] == pytest.approx(4e-3) and groups["query"]["lr"] == pytest.approx(1e-3)
        vids = {id(p) for p in groups["value"]["params"]}
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert ("v_proj" in n) == (id(p) in vids), n
            else:
                assert "k_proj" in n or "q_proj" not in n or "base_layer" in n
