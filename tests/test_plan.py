"""make plan: jobs, requested hours and disk of a configuration, before it is submitted."""
import subprocess
import sys
from pathlib import Path

import pytest

from llmscape import plan as PL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run_plan(*configs):
    from plan import merged_config

    files = [ROOT / "config" / c for c in configs]
    return PL.plan(files, ROOT, merged_config(files))


@pytest.mark.slow
def test_plan_of_the_70b_config_counts_multi_gpu_jobs_and_disk():
    p = run_plan("llama3-70b.yaml")
    rules = {r["rule"]: r for r in p["rules"]}
    # 4 shot counts x (base + 2 fine-tuning runs + 1 intervention), each on 4 GPUs for 8 h requested
    assert rules["extract"]["jobs"] == 16 and rules["extract"]["gpus_per_job"] == 4
    assert rules["extract"]["gpu_hours"] == pytest.approx(16 * 4 * 480 / 60)
    assert rules["finetune"]["jobs"] == 2 and rules["finetune"]["gpus_per_job"] == 8
    assert rules["plot_geometry"]["local"] and rules["plot_geometry"]["gpu_hours"] == 0
    assert p["questions"] == 9183 and p["shape"]["layers"] == 80 and p["shape"]["hidden"] == 8192
    d = p["disk"]
    assert d["extractions"] == pytest.approx(16 * 81 * 9183 * 8192 * 2)  # layers + 1, float16 states
    assert d["base_model"] == pytest.approx(70.55e9 * 2, rel=1e-3)
    assert d["finetune_merged"] == pytest.approx(2 * (1 + 5) * 70.55e9 * 2, rel=1e-3)
    assert d["finetune_adapters"] < d["finetune_merged"] / 50  # adapters: a few per mille of merged copies
    assert "no GPU rehearsal" in p["expected"]["note"]
    text = PL.format_plan(p)
    assert "| extract | 16 | 4 | 480 min | 512.0 |" in text and "adapter checkpoints" in text


@pytest.mark.slow
@pytest.mark.parametrize("config", ["config/config.yaml", "config/ci.yaml", "config/llama3-8b.yaml"])
def test_make_plan_works_on_every_config(config):
    res = subprocess.run(["make", "-s", "plan", f"CONFIG={config}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| extract |" in res.stdout and "total (= peak)" in res.stdout


def test_local_rules_are_read_from_the_workflow():
    assert {"prepare_model", "prepare_data", "plot_geometry", "plot_join"} <= PL.local_rules(ROOT)
    assert "extract" not in PL.local_rules(ROOT)
