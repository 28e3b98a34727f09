"""make plan: jobs, requested and expected hours and disk of a configuration, before it is submitted."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from llmscape import cost, hardware, plan as PL
from llmscape.data import analysis_subject_sizes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_plan(script_module):
    """The plan of config files of config/, merged as scripts/plan.py merges them."""
    merged_config = script_module("scripts/plan.py", "plan_script").merged_config

    def run(*configs):
        files = [ROOT / "config" / c for c in configs]
        return PL.plan(files, ROOT, merged_config(files))

    return run


@pytest.fixture(scope="module")
def llama_plans(base_card, run_plan):
    """The plans of both Llama configs (base_card: the embedded tokenizer the token counts fall back to)."""
    return {c: run_plan(c) for c in ("llama3-8b.yaml", "llama3-70b.yaml")}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["llama3-8b.yaml", "llama3-70b.yaml"])
def test_requested_gpu_hours_are_within_3x_of_expected_for_every_gpu_rule(llama_plans, config):
    p = llama_plans[config]
    gpu_rules = [r for r in p["rules"] if r["gpus_per_job"] > 0 and not r["local"]]
    assert {"extract", "finetune"} <= {r["rule"] for r in gpu_rules}
    for r in gpu_rules:
        assert "exp_gpu_hours" in r and not r.get("exp_missing"), r["rule"]
        ratio = r["gpu_hours"] / r["exp_gpu_hours"]
        assert 1.0 <= ratio <= 3.0, (config, r["rule"], r["gpu_hours"], r["exp_gpu_hours"])
        # no rule submits more than a few dozen GPU jobs (extraction: one job per variant)
        assert r["jobs"] <= 36, (r["rule"], r["jobs"])
    text = PL.format_plan(p)
    assert "expected GPU h" in text and "efficiency 0.40 of peak: assumed" in text
    assert "Assumption: tokens: counted with" in text


@pytest.mark.slow
def test_the_plan_counts_gpus_per_job_and_the_prefix_tree(llama_plans):
    cfg = yaml.safe_load((ROOT / "config/llama3-70b.yaml").read_text())
    p = llama_plans["llama3-70b.yaml"]
    rules = {r["rule"]: r for r in p["rules"]}
    gpus = cfg["resources"]["extract"]["gpu"]
    assert rules["extract"]["gpus_per_job"] == gpus > 1
    # a layer-by-layer sharded model computes on one GPU at a time: the GPU hours are its time x GPUs held
    assert rules["extract"]["exp_gpu_hours"] == pytest.approx(rules["extract"]["exp_cpu_hours"] * gpus
                                                              / cfg["resources"]["extract"]["cpus_per_task"])
    assert rules["finetune"]["gpus_per_job"] == 8
    # the prefix tree of permuted shots computes fewer tokens than the prompts hold, more than a 0-shot run
    note = next(n for n in p["expected"]["notes"] if n.startswith("tokens:"))
    assert "SmolLM2" in note or "own tokenizer" in note
    e8 = {r["rule"]: r for r in llama_plans["llama3-8b.yaml"]["rules"]}
    assert e8["spectra"]["jobs"] + e8["spectra_run"]["jobs"] == 17  # base + 3 interventions + 13 runs


@pytest.mark.slow
def test_plan_of_the_70b_config_counts_disk(run_plan):
    p = run_plan("llama3-70b.yaml")
    rules = {r["rule"]: r for r in p["rules"]}
    cfg = yaml.safe_load((ROOT / "config/llama3-70b.yaml").read_text())
    ex = cfg["resources"]["extract"]
    assert rules["extract"]["jobs"] == 4  # one job per variant (base + 2 fine-tuning runs + 1 intervention)
    assert rules["plot_geometry"]["local"] and rules["plot_geometry"]["gpu_hours"] == 0
    assert p["questions"] == 9183 and p["shape"]["layers"] == 80 and p["shape"]["hidden"] == 8192
    d = p["disk"]
    # 4 shot counts x 4 variants, layers + 1, float16 states
    assert d["extractions"] == pytest.approx(16 * 81 * 9183 * 8192 * 2)
    assert d["base_model"] == pytest.approx(70.55e9 * 2, rel=1e-3)
    assert d["finetune_merged"] == pytest.approx(2 * (1 + 5) * 70.55e9 * 2, rel=1e-3)
    assert d["finetune_adapters"] < d["finetune_merged"] / 50  # adapters: a few per mille of merged copies
    text = PL.format_plan(p)
    assert f"| extract | 4 | {ex['gpu']} |" in text and "adapter checkpoints" in text


@pytest.mark.slow
@pytest.mark.parametrize("config", ["config/config.yaml", "config/ci.yaml", "config/llama3-8b.yaml"])
def test_make_plan_works_on_every_config(config):
    res = subprocess.run(["make", "-s", "plan", f"CONFIG={config}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| extract |" in res.stdout and "total (= peak)" in res.stdout


def test_local_rules_are_read_from_the_workflow():
    assert {"prepare_model", "prepare_data", "plot_geometry", "plot_join"} <= PL.local_rules(ROOT)
    assert "extract" not in PL.local_rules(ROOT)


def test_flops_per_token_of_llama3_8b_from_its_shape():
    shape = PL.model_shape("meta-llama/Meta-Llama-3-8B", ROOT / "resources", ROOT / "bench/configs")
    assert shape.params == pytest.approx(8.03e9, rel=1e-3)
    assert shape.embedding_params == 2 * 128256 * 4096  # untied head
    # 2 x 6.98 B non-embedding parameters, + 2 x 32 blocks x 500 positions x 4096 for attention
    assert cost.flops_per_token(shape, 500) == pytest.approx(2 * 6.98e9 + 2 * 32 * 500 * 4096, rel=1e-3)
    assert shape.matrices[4] == (14336, 4096) and shape.matrices[1] == (1024, 4096)
    # Gram + eigenvalues of the smaller side: a 14336 x 4096 matrix reduces to a 4096 x 4096 problem
    assert cost.gram_flops(14336, 4096) == cost.gram_flops(4096, 14336)
    assert cost.gram_flops(14336, 4096) == pytest.approx(2 * 14336 * 4096**2 + 4 / 3 * 4096**3)


def test_a_rehearsal_on_another_gpu_carries_its_efficiency_by_the_ratio_of_peaks(tmp_path):
    """A FAKE rehearsal file (no GPU here): what an H200 run of bench/scale.py would write, reduced to the
    keys the plan reads."""
    built = dict(layers_built=32, layers_full=32, params_built=8030261248, params_full=8030261248,
                 hidden_size=4096, intermediate_size=14336, vocab_size=128256)
    runs = {"5shot_permuted_shared": dict(shots=5, shot_order="permuted", prefix_sharing=True, tokens_per_s=20000.0),
            "5shot_permuted_no_sharing": dict(shots=5, shot_order="permuted", prefix_sharing=False,
                                              tokens_per_s=30000.0),
            "0shot": dict(shots=0, shot_order="permuted", prefix_sharing=True, tokens_per_s=90000.0)}
    fake = dict(schema="llmscape.scale/2", device=dict(kind="cuda", name="NVIDIA H200", memory_gb=141),
                model_built=built, extraction=dict(measured=dict(runs=runs)))
    (tmp_path / "bench/results").mkdir(parents=True)
    (tmp_path / "bench/results/scale_llama3-8b_h200.json").write_text(json.dumps(fake))
    a100 = cost.rates(tmp_path, "llama3-8b", "a100_80gb")
    h200 = cost.rates(tmp_path, "llama3-8b", "h200")
    eff = 20000.0 * 2 * (8030261248 - 2 * 128256 * 4096) / 989e12
    assert h200.extract == pytest.approx(eff * 989e12)
    assert a100.extract / h200.extract == pytest.approx(hardware.GPUS["a100-80"].bf16_tflops / 989)
    assert any("measured on NVIDIA H200" in n and "ratio of peaks" in n for n in a100.notes)
    # the run of the configured protocol: without the prefix tree, the no-sharing run's rate
    plain = cost.rates(tmp_path, "llama3-8b", "h200", sharing=False)
    assert plain.extract / h200.extract == pytest.approx(30000 / 20000)
    # training was not rehearsed in the fake file: its efficiency stays assumed, and says so
    assert a100.train == pytest.approx(cost.ASSUMED_EFFICIENCY["train"] * 312e12)
    assert any(n.startswith("train efficiency") and "assumed" in n for n in a100.notes)


def test_padded_length_is_the_mean_of_the_longest_in_each_batch():
    assert cost.padded_length([10, 10, 10], 4) == 10
    assert 10 < cost.padded_length([10, 20] * 50, 4) < 20
    assert cost.padded_length([10, 20] * 50, 1) == 15


def test_a_job_over_several_shot_counts_reads_the_weights_once():
    shape = PL.model_shape("meta-llama/Meta-Llama-3-8B", ROOT / "resources", ROOT / "bench/configs")
    counts = {k: dict(plain=1e6 * (k + 1), tree=5e5 * (k + 1), lengths=[100]) for k in (0, 1, 2, 5)}
    tokens = dict(counts=counts, questions=10_000, notes=[])
    rates = cost.Rates(gpu=None, extract=1e14, train=1e14, cpu_core=2.7e10)
    ctx = cost.Context(dict(extract=dict(prefix_sharing=True)), shape, rates, tokens, 10_000, None)
    per_shot = [cost.job_seconds(ctx, dict(rule="extract", wildcards=dict(variant="base", shots=str(k)), gpus=1,
                                           cpus=8)) for k in (0, 1, 2, 5)]
    out = [f"results/reps/m/base/{k}shot.h5" for k in (0, 1, 2, 5)] + ["results/reps/m/base/0shot.json"]
    together = cost.job_seconds(ctx, dict(rule="extract", wildcards=dict(variant="base"), output=out, gpus=1, cpus=8))
    assert cost.extract_job_shots(dict(wildcards={}, output=out)) == [0, 1, 2, 5]
    assert together == pytest.approx(sum(per_shot) - 3 * cost.load_seconds(shape))
    assert cost.load_seconds(shape) > 0


def test_a_replication_set_costs_the_geometry_of_its_own_questions():
    """replication_geometry is modelled: the geometry of the set's questions, so two halves of the
    subjects cost about half a full geometry each (the graph grows as n^2, the metrics as n)."""
    shape = PL.model_shape("meta-llama/Meta-Llama-3-8B", ROOT / "resources", ROOT / "bench/configs")
    config = yaml.safe_load((ROOT / "config/llama3-8b.yaml").read_text())
    sets = config["geometry"]["replication"]["sets"]
    sizes = analysis_subject_sizes(config["data"])
    n_q = sum(sizes.values())
    rates = cost.Rates(gpu=None, extract=1e14, train=1e14, cpu_core=2.7e10)
    ctx = cost.Context(config, shape, rates, dict(counts={}, questions=n_q, notes=[]), n_q, (1e-11, 1e-3, "test"))
    job = dict(rule="geometry", wildcards=dict(variant="base", shots="5"), gpus=0, cpus=16)
    whole = cost.job_seconds(ctx, job)
    halves = {}
    for name, subjects in sets.items():
        rjob = dict(job, rule="replication_geometry", wildcards=dict(job["wildcards"], rset=name))
        halves[name] = cost.job_seconds(ctx, rjob)
        assert cost.replication_questions(ctx, name) == sum(sizes[s] for s in subjects)
    assert sum(cost.replication_questions(ctx, n) for n in sets) == n_q  # the two sets split every subject
    for name, sec in halves.items():
        assert cost.START_S < sec < whole, (name, sec, whole)
    assert sum(halves.values()) - 2 * cost.START_S < whole - cost.START_S  # n^2: the halves together cost less
