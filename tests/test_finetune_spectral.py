"""Fine-tuning method spectral: its own properties (the shared training path is in test_finetune.py)."""
import torch

from finetune_kit import TINY_SHAPES, load, run_of
from llmscape.finetune import registry
from llmscape.finetune.data import answer_loss, collate
from llmscape.finetune.spectral_r import SpectralRLinear, cayley


def test_spectral_a_equals_lora_count_and_spectral_r_is_2r2():
    shapes = {f"model.layers.0.self_attn.{k}": v for k, v in TINY_SHAPES.items()}
    for r in (1, 3, 8):
        assert (registry.get("spectral-a").expected_trainable(shapes, run_of("spectral-a", rank=r))
                == registry.get("lora").expected_trainable(shapes, run_of("lora", rank=r)))
        assert registry.get("spectral-r").expected_trainable(shapes, run_of("spectral-r", rank=r, scale=False)) \
            == 7 * 2 * r * r


def test_spectral_r_rotations_stay_orthogonal(tiny_dir, examples):
    g = torch.Generator().manual_seed(0)
    for r in (1, 4, 16):
        Q = cayley(torch.randn(r, r, generator=g) * 5)
        assert torch.allclose(Q.T @ Q, torch.eye(r), atol=1e-5)
    run = run_of("spectral-r", rank=8, lr=0.2)  # large steps: the rotations move far from I
    model = registry.get("spectral-r").apply(load(tiny_dir), run).model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    batch = collate(examples[:4], pad_id=0)
    for _ in range(3):
        answer_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    moved = 0.0
    for mod in model.modules():
        if isinstance(mod, SpectralRLinear):
            QA, QB = mod.rotations()
            eye = torch.eye(mod.r)
            assert torch.allclose(QA.T @ QA, eye, atol=1e-5) and torch.allclose(QB.T @ QB, eye, atol=1e-5)
            U2, _, V2 = mod.factors()  # rotated singular vectors stay orthonormal
            assert torch.allclose(U2.T @ U2, eye, atol=1e-4) and torch.allclose(V2.T @ V2, eye, atol=1e-4)
            moved = max(moved, float((QA - eye).abs().max().detach()))
    assert moved > 1e-2


def test_spectral_sign_convention_is_stored(tiny_dir):
    model = registry.get("spectral-a").apply(load(tiny_dir), run_of("spectral-a")).model
    sd = model.state_dict()
    U = sd["model.layers.0.self_attn.q_proj.spectral_U"]
    assert "model.layers.0.self_attn.q_proj.spectral_V" in sd
    top = U.gather(0, U.abs().argmax(0, keepdim=True))
    assert (top > 0).all()
