"""Fine-tuning stage: parameter counts, zero init, learning, orthogonality, merge, resume,
DeepSpeed, several processes, preemption and bad-input errors: the path every method trains through.
Most tests use the tiny random Llama of finetune_kit.py (seconds); each method's own properties are in
test_finetune_<method>.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from checkout import child_env
from finetune_kit import (
    ROOT,
    SMOL,
    TINY_SHAPES,
    H,
    L,
    all_methods,
    assert_same_training,
    job_spec_tiny,
    load,
    perturb_trainable,
    run_of,
    train_tiny,
)
from llmscape.adapters import load_weights
from llmscape.finetune import grid, registry
from llmscape.finetune.common import Context, FinetuneError, linear_shapes, trainable_count
from llmscape.finetune.data import answer_loss, collate
from llmscape.finetune.merge import save_adapter, save_merged
from llmscape.finetune.train import Preempted, checkpoint_steps


# ---------------------------------------------------------------- parameter counts (formulas)
def formula(run, ranks_info=None):
    """Independent closed forms for the tiny model (per layer, times L)."""
    r = run.rank or 0
    lora_all = L * r * sum(o + i for o, i in TINY_SHAPES.values())
    qv = [TINY_SHAPES["q_proj"], TINY_SHAPES["v_proj"]]
    if run.method in ("lora", "spectral-a"):
        return lora_all
    if run.method == "lora-adaptive":
        return sum(rr * sum(TINY_SHAPES[n.rsplit(".", 1)[1]]) for n, (rr, _) in ranks_info.items())
    if run.method == "attn-qv":
        return L * (sum(r * (o + i) for o, i in qv) if run.opt("mode") == "lora" else sum(o * i for o, i in qv))
    if run.method == "spectral-r":
        return 7 * L * (2 * r * r + (r if run.opt("scale") else 0))
    if run.method == "srank-calibrated":  # fraction 0.5 of L=2 layers -> 1 per component type
        return r * sum(o + i for o, i in TINY_SHAPES.values())
    raise AssertionError(run.method)


def test_trainable_counts_match_formulas(tiny_dir, ranks_file):
    from peft.tuners.lora import LoraLayer

    path, names = ranks_file
    for run in all_methods(ranks_file):
        model = load(tiny_dir)
        shapes = linear_shapes(model)
        m = registry.get(run.method)
        model = m.apply(model, run, Context()).model
        want = formula(run, names)
        assert trainable_count(model) == want, run.method
        if run.method != "srank-calibrated":
            assert m.expected_trainable(shapes, run, Context()) == want, run.method
        if run.method == "lora-adaptive":  # every selected module got its own rank and alpha
            seen = {}
            for n, mod in model.named_modules():
                if isinstance(mod, LoraLayer) and hasattr(mod, "lora_A") and "default" in mod.lora_A:
                    key = n.removeprefix("base_model.model.")
                    seen[key] = (mod.lora_A["default"].weight.shape[0], mod.scaling["default"])
            assert seen == {n: (r, a / r) for n, (r, a) in names.items()}


# ---------------------------------------------------------------- zero init, learning, orthogonality
def test_every_method_equals_base_before_training(tiny_dir, ranks_file):
    ids_ = torch.randint(0, 49000, (2, 17), generator=torch.Generator().manual_seed(1))
    base = load(tiny_dir)(ids_).logits
    for run in all_methods(ranks_file):
        model = registry.get(run.method).apply(load(tiny_dir), run, Context()).model.eval()
        with torch.no_grad():
            out = model(input_ids=ids_).logits
        assert torch.equal(out, base) or torch.allclose(out, base, atol=1e-6, rtol=0), run.method


def test_few_real_steps_lower_the_loss(tiny_dir, ranks_file, examples):
    batch = collate(examples[:4], pad_id=0)
    for run in all_methods(ranks_file):
        torch.manual_seed(0)
        model = registry.get(run.method).apply(load(tiny_dir), run, Context()).model
        model.train()
        groups = registry.param_groups(model, run)
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=run.lr)
        with torch.no_grad():
            model.eval()
            before = float(answer_loss(model, batch)[0])
        model.train()
        for _ in range(5):
            loss, _ = answer_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            after = float(answer_loss(model, batch)[0])
        assert after < before - 0.05, (run.method, before, after)


# ---------------------------------------------------------------- merge
def test_merged_weights_match_unmerged_adapter(tiny_dir, ranks_file, tmp_path):
    from safetensors import safe_open

    ids_ = torch.randint(0, 49000, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = load(tiny_dir)(input_ids=ids_).logits
    for k, run in enumerate(all_methods(ranks_file)):
        torch.manual_seed(k)
        applied = registry.get(run.method).apply(load(tiny_dir), run, Context())
        model = perturb_trainable(applied.model)
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids_).logits
        dest = save_merged(applied.trained, tiny_dir, tmp_path / f"m{k}")
        with torch.no_grad():
            got = load(dest)(input_ids=ids_).logits
        assert not torch.allclose(want, base, atol=1e-4), run.method
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (run.method, float((got - want).abs().max()))
        with (safe_open(dest / "model.safetensors", "pt") as a,
              safe_open(Path(tiny_dir) / "model.safetensors", "pt") as b):
            assert set(a.keys()) == set(b.keys())
            assert torch.equal(a.get_tensor("model.embed_tokens.weight"), b.get_tensor("model.embed_tokens.weight"))
        assert (dest / "tokenizer.json").exists() and (dest / "config.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_checkpoints_give_the_merged_weights_and_states(tiny_dir, ranks_file, data_dir, tmp_path, dtype):
    """Adapters (megabytes) instead of merged copies: for every method, the weights built from base plus
    adapter equal the merged copy bit for bit (on a bf16 base too), and so do the model the extraction
    loads, its states, and the spectra streamed from them."""

    from llmscape import data as D, extract as E
    from llmscape.adapters import is_adapter, read_adapter
    from llmscape.models import load as load_model
    from llmscape.spectra.stream import compute_spectra

    base = tiny_dir
    if dtype is torch.bfloat16:
        base = tmp_path / "base_bf16"
        load(tiny_dir).to(dtype).save_pretrained(base)
        for f in Path(tiny_dir).glob("tokenizer*"):
            (base / f.name).write_bytes(f.read_bytes())
    rows, pool = D.load_prepared(data_dir)
    rows = rows.head(4)
    for k, run in enumerate(all_methods(ranks_file)):
        torch.manual_seed(k)
        applied = registry.get(run.method).apply(load(base), run, Context())
        perturb_trainable(applied.model)
        merged = save_merged(applied.trained, base, tmp_path / f"m{k}")
        adapter = save_adapter(applied.trained, tmp_path / f"a{k}")
        assert is_adapter(adapter) and not is_adapter(merged)
        size = sum(f.stat().st_size for f in adapter.glob("*"))
        assert size < sum(f.stat().st_size for f in merged.glob("*.safetensors")), run.method
        wm, wa = load_weights(merged, base), load_weights(adapter, base)
        assert wm.keys() == wa.keys() and all(torch.equal(wm[n], wa[n]) for n in wm), run.method
        plain = load_weights(base, base)
        assert read_adapter(adapter) and any(not torch.equal(wa[n], plain[n]) for n in plain), run.method
        _, m1 = load_model(merged)
        _, m2 = load_model(base, adapter=adapter)
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert all(torch.equal(s1[n], s2[n]) for n in s1), run.method
        sp1 = compute_spectra(merged, device="cpu").drop(columns="seconds")
        sp2 = compute_spectra(base, device="cpu", adapter=adapter).drop(columns="seconds")
        pd.testing.assert_frame_equal(sp1, sp2)
        if k == 0:  # extraction through the cards, as the workflow runs it
            card_m = dict(path=str(merged), checksum="m", model="tiny", variant="m")
            card_a = dict(path=str(base), adapter=str(adapter), checksum="a", model="tiny", variant="a")
            cfg = E.ExtractConfig(shots=1, device="cpu", dtype="float32")
            E.extract(card_m, rows, pool, cfg, tmp_path / "m.h5")
            E.extract(card_a, rows, pool, cfg, tmp_path / "a.h5")
            assert np.array_equal(E.read_states(tmp_path / "m.h5")["hidden"],
                                  E.read_states(tmp_path / "a.h5")["hidden"])


@pytest.mark.parametrize("method", ["lora", "spectral-r"])
def test_resume_after_kill_matches_uninterrupted(tiny_dir, data_dir, tmp_path, method):
    # lora with dropout: the RNG state must be restored too; spectral-r: its SVD buffers must reload
    run = run_of("lora", rank=4, lr=5e-3, dropout=0.1) if method == "lora" else run_of("spectral-r", rank=4, lr=5e-2)
    full = train_tiny(run, tiny_dir, data_dir, tmp_path / "full")
    with pytest.raises(Preempted):
        train_tiny(run, tiny_dir, data_dir, tmp_path / "cut", stop_after=3)
    assert list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    resumed = train_tiny(run, tiny_dir, data_dir, tmp_path / "cut")
    assert len(resumed["train_loss"]) == 6
    assert_same_training(tiny_dir, full, tmp_path / "full", resumed, tmp_path / "cut")
    if method != "lora":
        return
    # outputs of a run: metrics, adapter checkpoints at log-spaced steps, TensorBoard events
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "accuracy", "trainable_params", "wall_time_s", "peak_memory_mb", "versions"):
        assert key in m
    assert m["checkpoints"] == checkpoint_steps(6, 3) == [1, 2, 6]
    assert [v["step"] for v in m["val_loss"]] == [1, 2, 4, 6]  # every eval_every = 2 steps and every checkpoint
    assert all((tmp_path / "full" / "checkpoints" / f"step_{s}" / "adapter.json").exists() for s in m["checkpoints"])
    assert list((tmp_path / "full" / "tb").rglob("events.out.tfevents*"))
    assert m["accuracy"]["n"] == 6 and 0 <= m["accuracy"]["accuracy"] <= 1
    assert not (tmp_path / "full" / ".work" / "state").exists()


DS_SCRIPT = textwrap.dedent("""
    import json
    from llmscape.finetune import RunSpec, registry
    from llmscape.finetune.train import train
    m = registry.get("lora")
    run = RunSpec(method="lora", lr=5e-3, seed=0, rank=4, options=dict(m.defaults))
    met = train(run, base_path={tiny!r}, data_dir={data!r}, out_dir={out!r}, run_name="ds",
                train_cfg=dict(max_steps=2, batch_size=2, eval_every=2, val_rows=2, n_checkpoints=0,
                               deepspeed={cfg!r}), eval_cfg=dict(per_subject=1))
    print("RESULT", json.dumps(dict(ds=met["deepspeed"], steps=met["steps"], loss=met["train_loss"],
                                    engine=met["engine"])))
""")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])  # zero3: parameters partitioned, as for models beyond a GPU
def test_deepspeed_step_on_cpu(tiny_dir, data_dir, tmp_path, stage):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT.format(tiny=str(tiny_dir), data=str(data_dir),
                                       out=str(tmp_path / "out"), cfg=str(ROOT / f"config/deepspeed/{stage}.json")))
    env = dict(child_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), ACCELERATE_USE_DEEPSPEED="true")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["ds"].endswith(f"{stage}.json") and out["steps"] == 2 and out["engine"] == "DeepSpeedEngine"
    assert all(np.isfinite(x["loss"]) for x in out["loss"])
    from llmscape.adapters import read_adapter

    parts = read_adapter(tmp_path / "out" / "weights")  # gathered whole, not ZeRO-3's empty partitions
    assert parts and all(p["lora_A.0"].shape[0] == 4 and p["lora_A.0"].shape[1] > 0 and
                         p["lora_B.0"].abs().sum() > 0 for p in parts.values())


# ---------------------------------------------------------------- bad input, before any job
def test_unknown_method_is_named_with_a_fix():
    with pytest.raises(FinetuneError, match=r"unknown fine-tuning method 'lorra'.*Did you mean 'lora'"):
        grid.expand(dict(sweeps=[dict(method="lorra", lr=[1e-4])]))


@pytest.mark.parametrize("sweep, pattern", [
    (dict(method="lora", lr=[0.0]), r"lr value 0.0 is outside its range"),
    (dict(method="lora", lr=[5]), r"lr value 5 is outside its range"),
    (dict(method="lora", rank=[0]), r"rank value 0 is not an integer >= 1"),
    (dict(method="attn-qv", value_lr_ratio=[-2]), r"value_lr_ratio value -2 is outside"),
    (dict(method="lora", value_lr_ratio=[2]), r"'lora' does not use 'value_lr_ratio'"),
    (dict(method="lora-adaptive", rank=[8]), r"does not use 'rank'"),
    (dict(method="lora", seed=[-1]), r"seed value -1"),
    (dict(method="lora", options=dict(alpah=3)), r"unknown option\(s\) \['alpah'\]"),
])
def test_out_of_range_grid_values(sweep, pattern):
    with pytest.raises(FinetuneError, match=pattern):
        grid.expand(dict(sweeps=[sweep]))


def test_rank_larger_than_matrix():
    shapes = {f"model.layers.0.self_attn.{k}": v for k, v in TINY_SHAPES.items()}
    runs = grid.expand(dict(sweeps=[dict(method="spectral-r", rank=[33])]))
    with pytest.raises(FinetuneError, match=r"rank 33 is larger than matrix model.layers.0.self_attn.k_proj"):
        grid.validate(runs, shapes)
    grid.validate(grid.expand(dict(sweeps=[dict(method="spectral-r", rank=[32])])), shapes)


def test_run_names_are_variant_safe_and_unique():
    runs = grid.expand(dict(sweeps=[dict(method="attn-qv", lr=[1e-4, 5e-5], rank=[8], value_lr_ratio=[2, 4],
                                         seed=[0, 1]),
                                    dict(method="attn-qv", tag="full", options=dict(mode="full"), lr=[1e-4])]))
    import re

    assert len(runs) == 9
    assert "ft-attn-qv-r8-lr0.0001-vr2-s0" in runs and "ft-attn-qv-full-r8-lr0.0001-vr2-s0" in runs
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]*", n) for n in runs)
    with pytest.raises(FinetuneError, match="appears twice"):
        grid.expand(dict(sweeps=[dict(method="lora", lr=[1e-4]), dict(method="lora", lr=[1e-4])]))


def _dry_run(tmp_path, finetune: dict, **extra):
    import yaml

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(dict(finetune=finetune, **extra)))
    return subprocess.run(["snakemake", "-n", "--cores", "1", "finetune_all", "--configfile",
                           str(ROOT / "config/ci.yaml"), str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_stops_on_bad_grid_before_any_job(tmp_path):
    res = _dry_run(tmp_path, dict(sweeps=[dict(method="spectral-x", rank=[4])]))
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "unknown fine-tuning method 'spectral-x'" in out and "Did you mean" in out
    assert "rule finetune:" not in out and "Job stats" not in out
    if SMOL.exists():  # rank vs matrix needs the model's config.json
        res = _dry_run(tmp_path, dict(sweeps=[dict(method="lora", rank=[4096])]))
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "rank 4096 is larger than matrix" in out and "Job stats" not in out
    # impossible launches: more processes than requested GPUs; a dynamic srank schedule on several processes
    res = _dry_run(tmp_path, dict(sweeps=[dict(method="lora", rank=[4])], launch=dict(num_processes=4)),
                   resources=dict(finetune=dict(gpu=2)))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "num_processes is 4 but run" in out and "Job stats" not in out
    res = _dry_run(tmp_path, dict(sweeps=[dict(method="srank-calibrated", rank=[4])], launch=dict(num_processes=2),
                                  methods={"srank-calibrated": dict(warm_steps=4)}))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "changes the trained set during training" in out and "Job stats" not in out


def test_changed_settings_do_not_resume_an_old_state(tiny_dir, data_dir, tmp_path):
    run = run_of("lora", rank=4, lr=5e-3)
    with pytest.raises(Preempted):
        train_tiny(run, tiny_dir, data_dir, tmp_path / "r", stop_after=2)
    m = train_tiny(run, tiny_dir, data_dir, tmp_path / "r", tc=dict(max_steps=4, n_checkpoints=0))
    assert [x["step"] for x in m["train_loss"]] == [1, 2, 3, 4]  # started afresh, not at step 3


def test_two_processes_equal_one_process_with_the_global_batch(tiny_dir, data_dir, tmp_path):
    """The rule's multi-process path, for real: `accelerate launch` starts 2 CPU processes (gloo), each
    on half of every global batch; the trained weights equal one process on the whole batch (no dropout,
    one answer token per example, so the mean of the two halves' losses is the batch loss). A preempted
    2-process run (SIGTERM-equivalent stop after step 3) resumes to the same weights."""
    from llmscape.finetune.launch import run_job

    run = run_of("lora", rank=4, lr=5e-3, dropout=0.0)
    one = run_job(job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "one", batch_size=4), 1)
    two = run_job(job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "two", batch_size=2), 2, threads=2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["tokens"] == one["tokens"]  # every example of the global batch seen exactly once
    assert_same_training(tiny_dir, one, tmp_path / "one", two, tmp_path / "two")

    with pytest.raises(Preempted):
        run_job(job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "cut", batch_size=2) | dict(stop_after=3), 2,
                threads=2)
    assert list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    resumed = run_job(job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "cut", batch_size=2), 2, threads=2)
    assert [x["step"] for x in resumed["train_loss"]] == list(range(1, 7))
    assert_same_training(tiny_dir, two, tmp_path / "two", resumed, tmp_path / "cut")
    # TensorBoard of the first attempt survives the resume (the curves continue)
    assert len(list((tmp_path / "cut" / "tb").rglob("events.out.tfevents*"))) >= 2


SIGTERM_SCRIPT = textwrap.dedent("""
    import json, sys
    from llmscape.finetune.launch import run_job
    from llmscape.finetune.train import Preempted
    try:
        run_job(json.loads(open({spec!r}).read()), 2, threads=2)
    except Preempted as e:
        print("PREEMPTED", e)
        sys.exit(143)
    print("FINISHED")
""")


def test_sigterm_reaches_launched_processes_and_the_run_resumes(tiny_dir, data_dir, tmp_path):
    """Slurm's preemption signal, for real: SIGTERM to the rule's process while 2 launched processes
    train. It is forwarded through accelerate launch, the processes agree on a step, save, and the job
    exits as preempted; the rerun resumes from that step and ends where an uninterrupted run ends."""
    import signal
    import time

    from llmscape.finetune.launch import run_job

    run = run_of("lora", rank=4, lr=5e-3, dropout=0.0)
    tc = dict(batch_size=2, max_steps=300, eval_every=300, n_checkpoints=0)
    spec = job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "cut", **tc)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "job.py"
    script.write_text(SIGTERM_SCRIPT.format(spec=str(tmp_path / "spec.json")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env())
    deadline = time.monotonic() + 240
    while not list((tmp_path / "cut" / "tb").rglob("events.out.tfevents*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the trackers start after the SIGTERM handler, right before the first step
    time.sleep(0.5)  # well before the 300 steps end (a signal after the loop would find no handler)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143 and "PREEMPTED" in out, out[-3000:]
    saved = list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("_")[1]) < 300, saved
    resumed = run_job(spec, 2, threads=2)
    full = run_job(job_spec_tiny(run, tiny_dir, data_dir, tmp_path / "full", **tc), 2, threads=2)
    assert [x["step"] for x in resumed["train_loss"]] == list(range(1, 301))
    assert_same_training(tiny_dir, full, tmp_path / "full", resumed, tmp_path / "cut")


# ---------------------------------------------------------------- a new method is one folder: the plug-in contract

def test_a_method_defined_here_trains_through_the_same_path(tiny_dir, data_dir, tmp_path):
    """A toy method, written in this test only (no edit anywhere in the library): it trains the RMSNorm
    scales of the layers that an input file of its own lists. Registered, it goes through the grid's
    checks (its file must exist or be made by a rule), the launcher's job description, train(), its
    session's hooks, the adapter checkpoints and the merged weights like the six built-in methods."""
    import json
    from dataclasses import asdict, dataclass

    from safetensors.torch import load_file

    from llmscape.finetune.common import freeze_all, layer_index, whole_tensors
    from llmscape.finetune.launch import job_spec, run_job
    from llmscape.finetune.method import Applied, Method, Session, check_int

    @dataclass
    class Options:
        scale: int = 1  # an option, checked as every method's are

        def check(self):
            check_int("norm-tune", "scale", self.scale, 1)

    def inputs(run, model, ft):  # a file of its own: which layers' norms train
        return {"norm_layers": f"{ft['toy_dir']}/{model}/norm_layers.json"}

    def check_inputs(run, ctx, producible):
        path = ctx.path("norm_layers")
        if not (path.exists() or producible(str(path))):
            raise FinetuneError(f"norm-tune: {path} does not exist")

    def layers(ctx):
        return json.loads(ctx.path("norm_layers").read_text())

    def targets(shapes, run, ctx=None):
        return [n for n in shapes if layer_index(n) in layers(ctx) and n.endswith("q_proj")]

    class Counting(Session):  # the per-step hook and what it adds to the metrics
        def __init__(self, n_layers):
            self.n_layers, self.steps = n_layers, []

        def expected_trainable(self, shapes, before):
            return 2 * H * self.n_layers

        def after_step(self, step):
            self.steps.append(step)

        def metrics(self, n_trainable):
            return dict(norm_tune_steps=list(self.steps))

    def apply(model, run, ctx=None):
        freeze_all(model)
        for i in layers(ctx):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                model.get_submodule(f"model.layers.{i}.{norm}").weight.requires_grad_(True)
        return Applied(model, whole_tensors(model), Counting(len(layers(ctx))))

    toy = Method(name="norm-tune", axes=("lr", "seed"), options=Options, targets=targets,
                 expected_trainable=lambda shapes, run, ctx=None: None, apply=apply, inputs=inputs,
                 check_inputs=check_inputs)
    ft = dict(toy_dir=str(tmp_path / "toy_inputs"), sweeps=[dict(method="norm-tune", lr=[1e-2])])
    registry.register(toy)
    try:
        runs = grid.expand(ft)
        with pytest.raises(FinetuneError, match=r"norm-tune: scale = 0 must be an integer >= 1"):
            grid.expand(dict(sweeps=[dict(method="norm-tune", options=dict(scale=0))]))
        (name, run), = runs.items()
        ctx = registry.context(run, "tiny", ft)
        shapes = linear_shapes(load(tiny_dir))
        with pytest.raises(FinetuneError, match=r"run ft-norm-tune-lr0.01-s0: norm-tune: .*norm_layers.json does not"):
            grid.validate(runs, None, lambda r: registry.context(r, "tiny", ft))
        grid.validate(runs, None, lambda r: registry.context(r, "tiny", ft), producible=lambda path: True)
        ctx.path("norm_layers").parent.mkdir(parents=True)
        ctx.path("norm_layers").write_text("[1]")
        grid.validate(runs, shapes, lambda r: registry.context(r, "tiny", ft))
        assert name == "ft-norm-tune-lr0.01-s0"
        spec = job_spec(asdict(run), base_path=tiny_dir, data_dir=data_dir, out_dir=tmp_path / "toy",
                        train_cfg=dict(max_steps=6, batch_size=4, eval_every=2, val_rows=4, n_checkpoints=3,
                                       max_length=256), eval_cfg=dict(per_subject=3), inputs=ctx.inputs,
                        run_name="t", data_split="finetune", eval_split="analysis")
        met = run_job(json.loads(json.dumps(spec)), 1)  # as the rule's script runs it, from plain data
    finally:
        registry.METHODS.pop("norm-tune", None)
    assert met["trainable_params"] == met["expected_trainable"] == 2 * H
    assert met["norm_tune_steps"] == list(range(1, met["steps"] + 1))
    merged = load_weights(tmp_path / "toy" / "weights", tiny_dir)
    base = load_file(Path(tiny_dir) / "model.safetensors")
    changed = sorted(k for k in base if not torch.equal(merged[k], base[k]))
    assert changed == ["model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]


# the files that pass every method's declarations on (the workflow, the launcher, Context, train, merge)
# and the floors below them: none may name a method
GENERIC = ["src/llmscape/finetune/*.py", "src/llmscape/adapters.py", "src/llmscape/weightfiles.py",
           "src/llmscape/models.py", "src/llmscape/spectra/stream.py", "scripts/finetune.py",
           "workflow/rules/finetune.smk", "workflow/rules/functions/finetune.smk"]


def _code_words(path: Path) -> str:
    """The code of a file without its docstrings and comments (which may cite a method as an example)."""
    import ast
    import io
    import tokenize

    text = path.read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError:  # a Snakemake rule file: its comments out, the rest as it is
        return "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    doc_lines = {(n.lineno, n.end_lineno) for n in ast.walk(tree) if id(n) in docs}
    keep = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and (tok.start[0], tok.end[0]) in doc_lines):
            continue
        keep.append(tok.string)
    return " ".join(keep)


def test_no_method_is_named_outside_its_folder():
    """A method is its folder: the workflow, the launcher, Context, train and merge pass its declarations
    on without naming it (its folder name or its registry name), and nothing below them does either."""
    import re

    files = sorted({p for pat in GENERIC for p in ROOT.glob(pat)})
    assert len(files) > 10
    names = set()
    for m in registry.METHODS:
        names |= {m, m.replace("-", "_")}
    names = [n for n in names if n != "lora"]  # peft's LoRA, the technique four methods share, is not a name
    found = {}
    for f in files:
        code = _code_words(f)
        hits = [n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", code)]
        hits += ['"lora"'] if re.search(r"[\"']lora[\"']", code) else []
        if hits:
            found[str(f.relative_to(ROOT))] = hits
    assert found == {}
