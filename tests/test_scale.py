"""The scale rehearsal (bench/scale.py) in its CPU mode: two blocks of the exact Llama-3-8B shape, random
weights, every stage's real code path, so that the GPU command cannot rot unnoticed; and the GPU
rehearsal's script (bench/gpu_rehearsal.sh), whose plumbing is checked without running it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkout import child_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_rehearsal_runs_every_stage_at_llama3_8b_shapes(tmp_path, base_card):
    res = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--device", "cpu", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800, env=child_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "scale_llama3-8b_cpu_quick.json").read_text())
    assert r["schema"] == "llmscape.scale/2" and r["device"]["kind"] == "cpu"
    assert (tmp_path / "scale_llama3-8b_cpu_quick.png").stat().st_size > 0
    for part in ("extraction", "geometry", "spectra", "training"):
        assert "error" not in r[part], r[part].get("traceback")
    m = r["model_built"]
    assert (m["layers_built"], m["layers_full"], m["hidden_size"], m["intermediate_size"], m["vocab_size"]) == \
        (2, 32, 4096, 14336, 128256)
    assert abs(m["params_full"] - 8.030e9) < 1e6  # the published Llama-3-8B parameter count

    ex = r["extraction"]
    assert "partial" not in ex
    runs = ex["measured"]["runs"]
    assert set(runs) == {"5shot_permuted_shared", "5shot_permuted_no_sharing", "0shot", "5shot_fixed_shared"}
    for name, run in runs.items():
        # what ran (a hook on the decoder) is what the library's counter predicts: the whole-test-set
        # estimates rest on that counter
        assert run["tokens"] == run["tokens_counted"] > 0, name
        assert run["tokens_padded"] >= run["tokens"] and run["tokens_per_s"] > 0 and run["peak_memory_mb"] > 0
    assert runs["0shot"]["shots"] == 0  # measured directly, not scaled from 5 shots
    assert runs["5shot_permuted_shared"]["tokens"] < runs["5shot_permuted_no_sharing"]["tokens"]  # the tree
    for name, eq in ex["measured"]["equal_to_plain_forward"].items():
        assert eq["questions"] >= 2 and eq["max_rel_diff"] < 1e-4 and eq["min_cosine"] > 0.9999, name
    tok = ex["extrapolated"]["tokens"]
    assert ex["extrapolated"]["questions"] > 100  # every test question of the sample's subjects, counted
    assert tok["5shot_permuted_shared"]["run"] < tok["5shot_permuted_shared"]["plain"]
    assert tok["5shot_permuted_no_sharing"]["run"] == tok["5shot_permuted_no_sharing"]["plain"]
    assert tok["0shot"]["plain"] < tok["5shot_permuted_no_sharing"]["plain"]
    assert "scaled by depth 32/2" in ex["extrapolated"]["rule"] and "SmolLM2" in ex["extrapolated"]["tokenizer"]
    assert "time_ratio" not in ex["published"]  # no ratio to the published GPU figure from a CPU rate

    geo = r["geometry"]["measured"]
    assert geo["n"] == 9181 and geo["d"] == 4096 and geo["cpu"]["seconds_per_layer"] > 0

    sp = r["spectra"]
    assert sp["measured"]["matrices"] == 6 and sp["extrapolated"]["matrices"] == 224
    assert all(d["stable_rank"] >= 1 for d in sp["measured"]["matrices_detail"])

    tr = r["training"]
    # LoRA r = 64 on q, k, v, o, gate, up, down: 64 x sum(in + out) per block, at 1 and 2 blocks
    per_block = 64 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    for label in ("llmscape_lora", "plain_peft"):
        by = tr["measured"][label]["by_depth"]
        assert {L: v["trainable_params"] for L, v in by.items()} == {"1": per_block, "2": 2 * per_block}
    ext = tr["extrapolated"]
    assert "32 blocks" in ext["rule"] and set(ext["fit"]) == {"llmscape_lora", "plain_peft"}
    assert all(isinstance(f["valid"], bool) for f in ext["fit"].values())  # two short steps on CPU: noisy


def test_depth_fit_separates_the_head_from_the_blocks(script_module):
    scale = script_module("bench/scale.py", "bench_scale")

    # seconds per token: 3 (head) + 2 per block, measured at 1 and 2 blocks
    fit = scale.fit_depth({1: 5.0, 2: 7.0}, 32)
    assert fit["head_s_per_token"] == pytest.approx(3.0) and fit["block_s_per_token"] == pytest.approx(2.0)
    assert fit["full_s_per_token"] == pytest.approx(67.0) and fit["head_share_at_measured"] == pytest.approx(0.6)
    assert fit["valid"] and not scale.fit_depth({1: 5.0, 2: 4.0}, 32)["valid"]  # faster with more blocks: noise


def test_gpu_rehearsal_script_parses_and_refuses_without_its_assets(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_rehearsal.sh")]).returncode == 0
    res = subprocess.run(["bash", str(ROOT / "bench/gpu_rehearsal.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "prepare|run" in res.stderr
