"""DeepSpeed ZeRO-3 with parameters really partitioned, through every path a fine-tuning job takes.

The tiny Llama has an output head of its own (as Llama-3: not tied to the embeddings) and the ZeRO-3
JSON is config/deepspeed/zero3.json with ``stage3_max_live_parameters: 0`` and
``stage3_param_persistence_threshold: 0``: every parameter, however small, is an empty slice outside a
gather, as the big matrices of a 70B model are. Runs are the rule's own calls (``launch.run_job``): one
process in a subprocess (DeepSpeed's process group and its ``zero.Init`` hook would otherwise stay in
the test process), two processes through ``accelerate launch`` with gloo on CPU. Each is compared with
the same job trained without DeepSpeed, in the same tolerances as the multi-process tests of
test_finetune.py: equal loss curves (1e-5) and equal final weights (1e-6)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from checkout import child_env
from finetune_kit import ROOT, TINY_SHAPES, assert_same_training, job_spec_tiny, run_of
from llmscape.adapters import load_weights, read_adapter
from llmscape.finetune.launch import run_job
from llmscape.finetune.train import Preempted

pytest.importorskip("deepspeed")

RANK = 4
# 3 steps, checkpoints at steps 1 and 3, validation at 1, 2, 3 (or none with val_rows 0)
ZTC = dict(max_steps=3, batch_size=4, eval_every=2, val_rows=4, n_checkpoints=2, max_length=256)
EVAL = dict(per_subject=2)

ONE_PROCESS = textwrap.dedent("""
    import json, sys
    from llmscape.finetune.launch import run_job
    from llmscape.finetune.train import Preempted
    try:
        run_job(json.loads(open({spec!r}).read()), 1)
    except Preempted as e:
        print("PREEMPTED", e)
        sys.exit(143)
""")


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory):
    """The shipped ZeRO-3 JSON with nothing kept whole: no live-parameter budget, no persistent ones."""
    cfg = json.loads((ROOT / "config/deepspeed/zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    cfg["zero_optimization"].update(stage3_max_live_parameters=0, stage3_param_persistence_threshold=0)
    p = tmp_path_factory.mktemp("ds") / "zero3_partitioned.json"
    p.write_text(json.dumps(cfg))
    return p


LORA = run_of("lora", rank=RANK, lr=5e-3, dropout=0.0)  # no dropout: 2 processes = 1 on the global batch


def spec_of(tiny, data_dir, out, run=LORA, **tc):
    spec = job_spec_tiny(run, tiny, data_dir, out, **{**ZTC, **tc})
    spec["eval_cfg"] = dict(EVAL)
    return spec


def one_process(spec: dict, tmp: Path) -> dict:
    """``run_job(spec, 1)`` in a fresh interpreter, as the rule's job runs it; Preempted passes through."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "job.py").write_text(ONE_PROCESS.format(spec=str(tmp / "spec.json")))
    env = {k: v for k, v in child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(tmp / "job.py")], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 143 and "PREEMPTED" in res.stdout:
        raise Preempted(res.stdout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((Path(spec["out_dir"]) / "metrics.json").read_text())


def assert_whole_adapters(folder: Path):
    """Every saved LoRA tensor has its full shape (an empty ZeRO-3 slice would be (0,)) and B moved."""
    parts = read_adapter(folder)
    assert len(parts) == 7 * 2  # every projection of both layers
    for name, p in parts.items():
        out, inp = TINY_SHAPES[name.rsplit(".", 2)[-2]]
        assert tuple(p["lora_A.0"].shape) == (RANK, inp) and tuple(p["lora_B.0"].shape) == (out, RANK), name
        assert p["lora_B.0"].abs().sum() > 0, name


def assert_same_weights(tiny, met_a, dir_a, met_b, dir_b, moved: str, atol: float = 1e-6):
    """Equal loss curves (1e-5) and final weights (``atol``), and ``moved`` did train."""
    from safetensors.torch import load_file

    a, b = ([x["loss"] for x in m["train_loss"]] for m in (met_a, met_b))
    assert all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True)), (a, b)
    wa, wb = (load_weights(Path(d) / "weights", tiny) for d in (dir_a, dir_b))
    assert not torch.equal(wa[moved], load_file(Path(tiny) / "model.safetensors")[moved])
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[n], wb[n], atol=atol) for n in wa)


def test_one_process_zero3_runs_the_whole_job(tiny_untied_dir, data_dir, zero3_json, tmp_path):
    """Steps, validation at every checkpoint, adapter checkpoints, final evaluation (the LM head's letter
    rows), final adapter: all with partitioned parameters, and equal to the same job without DeepSpeed.
    With gradient checkpointing, as the 70B config trains (the backward pass gathers again)."""
    tc = dict(gradient_checkpointing=True)
    plain = run_job(spec_of(tiny_untied_dir, data_dir, tmp_path / "plain", **tc), 1)
    z3 = one_process(spec_of(tiny_untied_dir, data_dir, tmp_path / "z3", deepspeed=str(zero3_json), **tc),
                     tmp_path / "job")
    assert z3["engine"] == "DeepSpeedEngine" and z3["deepspeed"].endswith("zero3_partitioned.json")
    assert_same_training(tiny_untied_dir, plain, tmp_path / "plain", z3, tmp_path / "z3")
    # validation and the final evaluation computed on the whole weights (equal to the plain run's)
    assert [v["step"] for v in z3["val_loss"]] == [1, 2, 3]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(plain["val_loss"], z3["val_loss"], strict=True))
    assert z3["accuracy"] == plain["accuracy"] and z3["accuracy"]["n"] == 4
    # sizes counted whole, not as the empty slices
    assert z3["total_params"] == plain["total_params"] > 6_000_000
    assert z3["trainable_params"] == plain["trainable_params"] == z3["param_groups"][0]["n"]
    assert z3["checkpoints"] == [1, 3]
    for s in z3["checkpoints"]:
        assert_whole_adapters(tmp_path / "z3" / "checkpoints" / f"step_{s}")
        a, b = (read_adapter(tmp_path / d / "checkpoints" / f"step_{s}") for d in ("plain", "z3"))
        assert all(torch.allclose(a[n][k], b[n][k], atol=1e-6) for n in a for k in a[n])
    assert_whole_adapters(tmp_path / "z3" / "weights")


def test_two_processes_zero3_equal_one_process(tiny_untied_dir, data_dir, zero3_json, tmp_path):
    """Two processes (gloo), each half of every global batch, ZeRO-3 across them: every gather (forward
    passes, the head's letter rows, the adapters) is entered by both. Stopped after step 2 (each saves
    its slices) and resumed, the job ends with the weights of one process on the whole batch. No
    validation here, so the final evaluation meets the head released, as a job with ``val_rows: 0``."""
    plain = run_job(spec_of(tiny_untied_dir, data_dir, tmp_path / "plain", val_rows=0), 1)
    spec = spec_of(tiny_untied_dir, data_dir, tmp_path / "two", val_rows=0, batch_size=2, deepspeed=str(zero3_json))
    with pytest.raises(Preempted):
        run_job(spec | dict(stop_after=2), 2, threads=2)
    assert (tmp_path / "two" / ".work" / "state" / "step_0000002" / "COMPLETE").exists()
    two = run_job(spec, 2, threads=2)
    assert two["world_size"] == 2 and two["engine"] == "DeepSpeedEngine"
    assert [x["step"] for x in two["train_loss"]] == [1, 2, 3]
    assert two["tokens"] == plain["tokens"]  # every example of each global batch seen once
    assert_same_training(tiny_untied_dir, plain, tmp_path / "plain", two, tmp_path / "two")
    assert two["accuracy"] == plain["accuracy"]
    assert_whole_adapters(tmp_path / "two" / "weights")
    assert_whole_adapters(tmp_path / "two" / "checkpoints" / "step_1")  # written by the first attempt


def test_zero3_run_stopped_after_a_saved_state_resumes_to_the_same_weights(tiny_untied_dir, data_dir, zero3_json,
                                                                           tmp_path):
    """Full fine-tuning of the query and value matrices (attn-qv, mode full; values at twice the
    learning rate): the trained tensors are themselves partitioned base matrices. A ZeRO-3 job stopped
    after step 2 (its DeepSpeed state saved: the trained slices and their optimiser slices, not the
    frozen base) resumes at step 3 and ends where the uninterrupted job without DeepSpeed ends. Merged
    copies as checkpoints: the merge reads the gathered matrices. Weights within 1e-5 (1e-3 of the
    learning rate): Adam's m / (sqrt(v) + eps) turns the last-bit differences of a gradient near eps
    (DeepSpeed sums in its own flat buffers) into visible ones; measured 1.5e-6 here."""
    run = run_of("attn-qv", lr=5e-3, ratio=2.0, mode="full")
    tc = dict(val_rows=0, checkpoint_format="merged")
    plain = run_job(spec_of(tiny_untied_dir, data_dir, tmp_path / "plain", run, **tc), 1)
    spec = spec_of(tiny_untied_dir, data_dir, tmp_path / "cut", run, deepspeed=str(zero3_json), **tc)
    with pytest.raises(Preempted):
        one_process(spec | dict(stop_after=2), tmp_path / "job1")
    saved = list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    assert [p.name for p in saved] == ["step_0000002"]
    # only what training changes: not the frozen base tensors (a whole model per state at 70B)
    state_bytes = sum(f.stat().st_size for f in saved[0].rglob("*") if f.is_file())
    assert state_bytes < (Path(tiny_untied_dir) / "model.safetensors").stat().st_size / 20
    resumed = one_process(spec, tmp_path / "job2")
    assert [x["step"] for x in resumed["train_loss"]] == [1, 2, 3]
    assert resumed["param_groups"] == plain["param_groups"]  # query at lr, value at 2 lr, sizes whole
    assert_same_weights(tiny_untied_dir, plain, tmp_path / "plain", resumed, tmp_path / "cut",
                        "model.layers.1.self_attn.v_proj.weight", atol=1e-5)
    assert resumed["checkpoints"] == [1, 3]
    assert (tmp_path / "cut" / "checkpoints" / "step_1" / "model.safetensors").exists()


def test_spectral_adapter_takes_its_svd_of_the_whole_partitioned_matrix(tiny_untied_dir, data_dir, zero3_json,
                                                                         tmp_path):
    """Spectral^R wraps each targeted matrix with its top-r SVD, taken when the method is applied: under
    ZeRO-3 the matrix is a partitioned slice then, so it is gathered for the SVD. Two steps equal the
    job without DeepSpeed (an SVD of a slice would fail, or give other factors and other weights)."""
    run = run_of("spectral-r", rank=RANK, lr=5e-2)
    tc = dict(max_steps=2, n_checkpoints=0, val_rows=0)
    plain = run_job(spec_of(tiny_untied_dir, data_dir, tmp_path / "plain", run, **tc), 1)
    z3 = one_process(spec_of(tiny_untied_dir, data_dir, tmp_path / "z3", run, deepspeed=str(zero3_json), **tc),
                     tmp_path / "job")
    assert z3["trainable_params"] == plain["trainable_params"] and z3["engine"] == "DeepSpeedEngine"
    assert_same_weights(tiny_untied_dir, plain, tmp_path / "plain", z3, tmp_path / "z3",
                        "model.layers.1.mlp.down_proj.weight")
