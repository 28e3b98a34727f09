"""GPUs requested that cannot hold the model or that the job cannot use: errors before anything runs,
naming the keys and the fix (llmscape.gpufit, called when the DAG is built and in the extraction job)."""
import json
from pathlib import Path

import pytest

from llmscape import gpufit, models
from llmscape.errors import LlmscapeError
from llmscape.plan import model_shape

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT / "bench" / "configs"


def shape_of(model):
    s = model_shape(model, ROOT / "resources", KNOWN)
    return json.loads(Path(s.source).read_text()), s.params


LLAMA70 = shape_of("meta-llama/Meta-Llama-3-70B")
EXTRACT_70B = dict(device="cuda", dtype="bfloat16", token_budget=8192, device_map="auto")


def test_70b_footprint_from_its_shape():
    cfg, params = LLAMA70
    fp = gpufit.footprint(cfg, params, 2, 8192)
    assert fp.weights == pytest.approx(141.1e9, rel=1e-3)
    assert fp.kv == 8192 * 80 * 2 * 8 * 128 * 2              # 80 layers, 8 kv heads of 128, bf16
    assert fp.activations == 8192 * (4 * 8192 + 2 * 1024 + 3 * 28672) * 2
    assert gpufit.gpus_needed(fp, 80e9) == 2 and gpufit.gpus_needed(fp, 40e9) == 5
    assert gpufit.gpus_needed(fp, 141e9) == 2  # an H200 alone cannot hold 141 GB of weights and the rest


def test_the_70b_config_requests_the_fewest_80gb_gpus_that_hold_it():
    import yaml

    c = yaml.safe_load((ROOT / "config" / "llama3-70b.yaml").read_text())
    r = c["resources"]["extract"]
    assert gpufit.requested_gpu(r).memory_gb == 80 and r["gpu"] == 2
    assert gpufit.check_extract(c["extract"], r, *LLAMA70) is None  # fits, nothing idle
    with pytest.raises(gpufit.FitError):
        gpufit.check_extract(c["extract"], {**r, "gpu": 1}, *LLAMA70)


@pytest.mark.parametrize("r, fits", [
    ({"gpu": 4, "gpu_model": "a100"}, False),  # 'a100' admits 40 GB cards: 4 x 40 do not hold it
    ({"gpu": 2, "gpu_model": "a100_80gb"}, True),
    ({"gpu": 2, "gpu_model": "a100", "constraint": "a100_80gb"}, True),  # a site's feature names the 80 GB cards
    ({"gres": "gpu:a100-80gb:2"}, True),
    ({"gres": "gpu:h200:1"}, False),
])
def test_gpus_that_cannot_hold_the_model_fail_naming_keys_and_fix(r, fits):
    if fits:
        assert gpufit.check_extract(EXTRACT_70B, r, *LLAMA70) is None
        return
    with pytest.raises(gpufit.FitError) as e:
        gpufit.check_extract(EXTRACT_70B, r, *LLAMA70)
    msg = str(e.value)
    assert isinstance(e.value, LlmscapeError)
    assert "resources.extract" in msg and "extract.token_budget = 8192" in msg and "Fix:" in msg
    assert "141.1 GB of weights" in msg


def test_more_gpus_than_needed_is_a_note_and_unknown_gpus_are_left_to_the_job():
    note = gpufit.check_extract(EXTRACT_70B, {"gpu": 4, "gpu_model": "h100"}, *LLAMA70)
    assert note and "2 x NVIDIA H100" in note and "other 2" in note
    note = gpufit.check_extract(EXTRACT_70B, {"gpu": 2, "gpu_model": "mi300x"}, *LLAMA70)
    assert note and "'mi300x' unknown here" in note
    assert "model's shape unknown" in gpufit.check_extract(EXTRACT_70B, {"gpu": 2, "gpu_model": "h100"}, None, None)


def test_device_map_without_gpus_and_gpus_without_device_map():
    for r in ({}, {"gpu": 0, "gpu_model": "a100"}):
        with pytest.raises(gpufit.FitError, match=r"extract.device_map = 'auto' .* resources.extract.gpu requests "
                                                  r"none .* Fix: request them"):
            gpufit.check_extract(EXTRACT_70B, r, *LLAMA70)
    # on purpose: a CPU job that offloads what does not fit to disk
    assert gpufit.check_extract({**EXTRACT_70B, "device": "cpu"}, {}, *LLAMA70) is None
    with pytest.raises(gpufit.FitError, match=r"resources.extract.gpu = 4, but extract.device_map is null.*3 would "
                                              "idle"):
        gpufit.check_extract({**EXTRACT_70B, "device_map": None}, {"gpu": 4, "gpu_model": "h200"}, *LLAMA70)


def zero3(tmp_path, stage=3):
    f = tmp_path / f"zero{stage}.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return str(f)


@pytest.mark.parametrize("gpus", [0, 4])
def test_zero3_with_more_processes_than_gpus_fails(tmp_path, gpus):
    train = {"deepspeed": zero3(tmp_path), "device": "auto"}
    with pytest.raises(gpufit.FitError) as e:
        gpufit.check_zero3_launch(train, {"num_processes": 8}, gpus, "finetune_lora", [])
    msg = str(e.value)
    assert "finetune.train.deepspeed" in msg and "ZeRO-3 with finetune.launch.num_processes = 8" in msg
    assert f"resources.finetune_lora.gpu requests {gpus or 'no'} GPU(s)" in msg
    assert "Fix: resources.finetune.gpu: 8" in msg and f"finetune.launch.num_processes: {max(gpus, 1)}" in msg


def test_zero3_launches_that_can_start_pass(tmp_path):
    train = {"deepspeed": zero3(tmp_path), "device": "auto"}
    gpufit.check_zero3_launch(train, {"num_processes": 8}, 8, "finetune", [])
    gpufit.check_zero3_launch({**train, "device": "cpu"}, {"num_processes": 2}, 0, "finetune", [])  # gloo on CPU
    gpufit.check_zero3_launch({**train, "deepspeed": zero3(tmp_path, 2)}, {"num_processes": 8}, 0, "finetune", [])
    # a relative path is looked up in the workflow's folder too (the repository's own ZeRO-3 file)
    with pytest.raises(gpufit.FitError):
        gpufit.check_zero3_launch({**train, "deepspeed": "config/deepspeed/zero3.json"}, {"num_processes": 2}, 0,
                                  "finetune", [ROOT])
    with pytest.raises(gpufit.FitError, match="no such file"):
        gpufit.check_zero3_launch({**train, "deepspeed": "nowhere/zero3.json"}, {"num_processes": 2}, 0, "finetune",
                                  [ROOT])


def test_job_check_before_loading(base_card):
    """In the job: the model's own weights (safetensors headers) against the memory of the GPUs it got.
    No GPU here: the per-GPU totals are given as numbers (a stand-in for torch.cuda's properties)."""
    import torch

    folder = Path(base_card["path"])
    n = models.parameter_count(folder)
    assert n == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M, tied embeddings stored once
    fp = gpufit.footprint(json.loads((folder / "config.json").read_text()), n, 2, 4096)
    one = fp.weights + fp.kv + fp.activations + fp.block + gpufit.RESERVE_GB * 1e9  # what one GPU must have
    kw = dict(dtype=torch.bfloat16, token_budget=4096)
    assert models.plan_gpus(folder, [int(one) + 1], device_map=None, **kw) is None
    with pytest.raises(gpufit.FitError, match=r"extract.token_budget = 4096. Fix: .*nothing was loaded"):
        models.plan_gpus(folder, [int(one) - 1], device_map=None, **kw)
    # sharded over two such GPUs: a device map on GPUs 0 and 1 only
    placed = models.plan_gpus(folder, [int(one), int(one)], device_map="auto", **kw)
    assert set(placed.values()) == {0, 1}
    assert models.plan_gpus(folder, [int(one)] * 2, device_map="auto", max_memory={"0": "1GiB"}, **kw) is None


def test_70b_on_two_80gb_gpus_places_every_block_on_a_gpu():
    """accelerate's device map for Llama-3-70B (meta-device weights) within the caps the job computes for
    two 80 GB GPUs: nothing on the CPU or disk, 40 blocks on each, every GPU under its cap."""
    import collections

    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, params = LLAMA70
    fp = gpufit.footprint(cfg, params, 2, 8192)
    caps = gpufit.shard_budget(fp, [80e9, 80e9])
    placed = models.meta_device_map(KNOWN / "llama3-70b", caps, torch.bfloat16, strategy="auto")
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(KNOWN / "llama3-70b"), dtype=torch.bfloat16)
    sizes = compute_module_sizes(meta, dtype=torch.bfloat16)
    held = collections.Counter()
    for name, device in placed.items():
        held[device] += sizes[name]
    blocks = collections.Counter(d for k, d in placed.items() if k.startswith("model.layers."))
    assert set(held) == {0, 1} and blocks == {0: 40, 1: 40}
    assert all(held[i] <= caps[i] for i in (0, 1))
    assert sum(held.values()) == pytest.approx(fp.weights, rel=1e-6)
