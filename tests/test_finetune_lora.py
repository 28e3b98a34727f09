"""Fine-tuning method lora: its own properties (the shared training path is in test_finetune.py)."""
import pytest
import torch

from finetune_kit import SMOL, load, run_of
from llmscape.finetune import registry
from llmscape.finetune.common import trainable_count
from llmscape.finetune.data import answer_loss, collate


def test_real_model_lora_steps_lower_the_loss(examples):
    """SmolLM2-135M (the embedded model): three LoRA steps on four real MMLU answer-letter examples."""
    if not (SMOL / "model.safetensors").exists():
        pytest.skip("embedded model not converted")
    model = load(SMOL)
    run = run_of("lora", rank=4, lr=2e-3, dropout=0.0)
    model = registry.get("lora").apply(model, run).model
    assert trainable_count(model) == 4 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    batch = collate(examples[:4], pad_id=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    with torch.no_grad():
        before = float(answer_loss(model.eval(), batch)[0])
    model.train()
    for _ in range(3):
        answer_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = float(answer_loss(model.eval(), batch)[0])
    assert after < before - 0.1, (before, after)
