"""Fine-tuning method srank-calibrated: its own properties (the shared training path is in test_finetune.py)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from finetune_kit import TINY_SHAPES, L, load, run_of, train_tiny
from llmscape.adapters import load_weights
from llmscape.finetune.common import Context, linear_shapes
from llmscape.finetune.train import Preempted


def test_srank_selection_follows_direction(tiny_dir):
    from llmscape.finetune import srank_calibrated as m

    model = load(tiny_dir)
    names = m.targets(linear_shapes(model), run_of("srank-calibrated"))
    sr = m.stable_ranks(names, weights=lambda n: model.get_submodule(n).weight)
    for n in names:  # srank in [1, rank]
        assert 1.0 <= sr[n] <= min(TINY_SHAPES[n.rsplit('.', 1)[1]]) + 1e-4
    low = m.select(names, sr, run_of("srank-calibrated", direction="low"))
    high = m.select(names, sr, run_of("srank-calibrated", direction="high"))
    assert len(low) == len(high) == 7 and not set(low) & set(high)
    for comp in TINY_SHAPES:
        a = [n for n in low if n.endswith(comp)][0]
        b = [n for n in high if n.endswith(comp)][0]
        assert sr[a] <= sr[b]
    # the spectra parquet, when given, is used instead of the weights
    pq = Path(tiny_dir) / "base.parquet"
    pd.DataFrame(dict(model="tiny", variant="base", name=[n + ".weight" for n in names],
                      stable_rank=[float(i) for i in range(len(names))])).to_parquet(pq)
    sr2 = m.stable_ranks(names, Context(inputs={"sranks": str(pq)}))
    assert sr2[names[3]] == 3.0


def test_srank_time_aware_start_and_recalibration(tiny_dir, data_dir, tmp_path):
    """Warm phase of full fine-tuning until the stable ranks settle, then LoRA on the selection of the
    *current* weights; re-calibration keeps the trainable set equal to the current srank selection; the
    warm-phase weights are in the merged model; a run stopped in the warm phase resumes to the same result."""
    from safetensors.torch import load_file

    from llmscape.finetune import srank_calibrated as m
    from llmscape.spectra.esd import stable_rank

    # eps = 0 never settles: the LoRA phase commences at warm_steps
    run = run_of("srank-calibrated", rank=2, lr=5e-3, dropout=0.0, warm_steps=3, warm_check_every=1, warm_eps=0.0,
                 recalibrate_every=1)
    full = train_tiny(run, tiny_dir, data_dir, tmp_path / "full")
    sched = full["srank_schedule"]
    assert sched["lft_start_step"] == 3 and sched["warm_trainable_params"] == sum(
        L * a * b for a, b in TINY_SHAPES.values())
    kinds = [e["event"] for e in sched["events"]]
    assert kinds[:5] == ["start", "check", "check", "check", "commence"] and kinds[5:] == ["recalibrate"] * 3
    names = m.targets({f"model.layers.{i}.{'mlp' if c in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{c}": s
                       for i in range(L) for c, s in TINY_SHAPES.items()}, run)
    assert len(full["srank_selection"]) == 7 and set(full["srank_selection"]) <= set(names)  # 1 of 2 layers per type
    assert full["trainable_params"] == sum(2 * sum(TINY_SHAPES[n.rsplit(".", 1)[1]]) for n in full["srank_selection"])
    # every matrix moved in the warm phase (full fine-tuning), so all differ from the base in the merged model
    merged = load_weights(tmp_path / "full" / "weights", tiny_dir)
    base = load_file(Path(tiny_dir) / "model.safetensors")
    assert all(not torch.equal(merged[n + ".weight"], base[n + ".weight"]) for n in names)
    # the final selection is the one the merged weights' stable ranks give (re-calibrated at the last step)
    sr = {n: stable_rank(merged[n + ".weight"]) for n in names}
    assert m.select(names, sr, run) == full["srank_selection"]

    # stopped inside the warm phase, resumed: the same schedule and weights
    with pytest.raises(Preempted):
        train_tiny(run, tiny_dir, data_dir, tmp_path / "cut", stop_after=2)
    resumed = train_tiny(run, tiny_dir, data_dir, tmp_path / "cut")
    assert resumed["srank_schedule"]["events"][-1]["step"] == 6
    assert resumed["srank_selection"] == full["srank_selection"]
    assert np.allclose([x["loss"] for x in resumed["train_loss"]], [x["loss"] for x in full["train_loss"]], atol=1e-5)
    again = load_weights(tmp_path / "cut" / "weights", tiny_dir)
    assert all(torch.allclose(merged[n], again[n], atol=1e-6) for n in merged)


def test_srank_warm_phase_ends_when_stable_ranks_settle(tiny_dir, data_dir, tmp_path):
    # a huge eps settles at the first check: LoRA from step 1 with patience 1
    run = run_of("srank-calibrated", rank=2, lr=5e-3, dropout=0.0, warm_steps=5, warm_check_every=1, warm_eps=10.0,
                 warm_patience=1)
    met = train_tiny(run, tiny_dir, data_dir, tmp_path / "r", tc=dict(max_steps=3, n_checkpoints=0))
    assert met["srank_schedule"]["lft_start_step"] == 1
    assert met["srank_schedule"]["events"][2]["why"] == "stable ranks settled"
