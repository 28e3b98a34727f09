"""The scale rehearsal (bench/scale.py) in its CPU mode: two blocks of the exact Llama-3-8B shape, random
weights, every stage's real code path, so that the GPU command cannot rot unnoticed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_rehearsal_runs_every_stage_at_llama3_8b_shapes(tmp_path, base_card):
    res = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--device", "cpu", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "scale_llama3-8b_cpu_quick.json").read_text())
    assert r["schema"] == "llmscape.scale/1" and r["device"]["kind"] == "cpu"
    assert (tmp_path / "scale_llama3-8b_cpu_quick.png").stat().st_size > 0
    for part in ("extraction", "geometry", "spectra", "training"):
        assert "error" not in r[part], r[part].get("traceback")
    m = r["model_built"]
    assert (m["layers_built"], m["layers_full"], m["hidden_size"], m["intermediate_size"], m["vocab_size"]) == \
        (2, 32, 4096, 14336, 128256)
    assert abs(m["params_full"] - 8.030e9) < 1e6  # the published Llama-3-8B parameter count

    ex = r["extraction"]
    runs = ex["measured"]["runs"]
    assert runs["prefix_shared"]["tokens"] < runs["no_sharing"]["tokens"]  # the shared prefix runs once
    assert all(v["tokens_per_s"] > 0 and v["peak_memory_mb"] > 0 for v in runs.values())
    eq = ex["measured"]["equal_to_plain_forward"]
    assert eq["questions"] >= 2 and eq["max_rel_diff"] < 1e-4 and eq["min_cosine"] > 0.9999
    tok = ex["extrapolated"]["tokens"]
    assert tok["5shot_prefix_shared"] < tok["5shot_no_sharing"] and tok["0shot_no_sharing"] < tok["5shot_no_sharing"]
    assert "scaled by depth 32/2" in ex["extrapolated"]["rule"]  # an extrapolation says so

    geo = r["geometry"]["measured"]
    assert geo["n"] == 9181 and geo["d"] == 4096 and geo["cpu"]["seconds_per_layer"] > 0

    sp = r["spectra"]
    assert sp["measured"]["matrices"] == 6 and sp["extrapolated"]["matrices"] == 224
    assert all(d["stable_rank"] >= 1 for d in sp["measured"]["matrices_detail"])

    tr = r["training"]["measured"]
    # LoRA r = 64 on q, k, v, o, gate, up, down of two blocks: 64 x sum(in + out) per block
    per_block = 64 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert tr["llmscape_lora"]["trainable_params"] == tr["plain_peft"]["trainable_params"] == 2 * per_block
    assert tr["llmscape_lora"]["tokens_per_s"] > 0 and tr["ratio_tokens_per_s"] > 0
