"""Known-answer tests of the spectra stage: random-matrix theory, planted spikes, power laws,
degenerate matrices, the stable-rank intervention, and adaptive ranks on a real peft model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llmscape.spectra import COLUMNS, adaptive, esd, intervene, stream
from llmscape.spectra.esd import DegenerateMatrixWarning

ROOT = Path(__file__).resolve().parents[1]


def evals_of(W: np.ndarray) -> np.ndarray:
    return np.linalg.svd(W, compute_uv=False) ** 2


def planted(n, m, strengths, rng):
    k = len(strengths)
    W = rng.normal(0, 1, (n, m))
    U, _ = np.linalg.qr(rng.normal(size=(n, k)))
    V, _ = np.linalg.qr(rng.normal(size=(m, k)))
    return W + U @ np.diag(strengths) @ V.T


# ---------------------------------------------------------------------------------------------
# Random-matrix theory known answers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(800, 400), (500, 500), (1500, 200)])
def test_gaussian_bulk_edge_matches_theory_and_has_no_spikes(n, m):
    rng = np.random.default_rng(n + m)
    s = 0.05
    spikes = 0
    for _ in range(2):
        W = rng.normal(0, s, (n, m))
        ev = evals_of(W)
        met = esd.compute_metrics(ev, n, m)
        theory = n * s ** 2 * (1 + math.sqrt(m / n)) ** 2
        assert met["mp_edge_mean"] == pytest.approx(theory, rel=0.01)
        assert met["mp_edge_fit"] == pytest.approx(theory, rel=0.02)
        assert met["sigma_mp_mean"] == pytest.approx(s, rel=0.005)
        assert met["sigma_mp_fit"] == pytest.approx(s, rel=0.01)
        assert ev.max() == pytest.approx(theory, rel=0.05)  # the top eigenvalue sits at the edge
        spikes += met["num_spikes"] + met["num_spikes_mean"]
    assert spikes <= 1  # "almost no spikes": the TW margin is the 99% quantile


def test_tracy_widom_scale_matches_monte_carlo():
    """(lambda_max / (N sigma^2) - edge) / tw is TW1-distributed: mean -1.21, sd 1.27."""
    rng = np.random.default_rng(7)
    n, m = 400, 200
    tw = esd.compute_tw_scale(n, m)
    edge = (1 + math.sqrt(m / n)) ** 2
    z = [(np.linalg.eigvalsh(W.T @ W)[-1] / n - edge) / tw for W in (rng.normal(size=(n, m)) for _ in range(300))]
    assert np.mean(z) == pytest.approx(-1.21, abs=0.35)
    assert np.std(z) == pytest.approx(1.27, abs=0.3)


@pytest.mark.parametrize("c", [1.0, 0.5, 0.1])
def test_mp_quantiles_have_unit_mean_and_the_right_support(c):
    q = esd.return_mp_quantiles(c, (np.arange(20000) + 0.5) / 20000)
    assert q.mean() == pytest.approx(1.0, abs=2e-3)  # the MP law with variance 1 has mean 1
    assert q.min() >= (1 - math.sqrt(c)) ** 2 - 1e-9
    assert q.max() <= (1 + math.sqrt(c)) ** 2 + 1e-9
    assert q.max() == pytest.approx((1 + math.sqrt(c)) ** 2, rel=5e-3)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_planted_rank_k_signal_gives_k_spikes(k):
    rng = np.random.default_rng(k)
    n, m = 900, 300
    W = planted(n, m, [120.0] * k, rng)  # signal singular values 120 >> BBP threshold (n m)^(1/4) ~ 23
    met = esd.compute_metrics(evals_of(W), n, m)
    assert met["num_spikes"] == k
    assert met["num_spikes_mean"] == k
    assert met["sigma_mp_fit"] == pytest.approx(1.0, rel=0.02)  # the fit sees the bulk, not the spikes
    assert met["sigma_mp_mean"] > met["sigma_mp_fit"]  # spikes inflate the mean-based sigma


def test_mean_sigma_spike_count_is_conservative():
    """Strong spikes inflate the mean eigenvalue and hide weaker ones from num_spikes_mean, not from the fit."""
    rng = np.random.default_rng(11)
    n, m = 900, 300
    W = planted(n, m, [60.0 * i for i in range(1, 7)], rng)
    met = esd.compute_metrics(evals_of(W), n, m)
    assert met["num_spikes"] == 6
    assert met["num_spikes_mean"] < 6


def powerlaw_evals(alpha, n, rng, xmin=0.1):
    return xmin * (1 - rng.random(n)) ** (-1 / (alpha - 1))  # density ~ lambda^-alpha for lambda >= xmin


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5, 5.0])
def test_hill_alpha_recovers_power_law_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    lam = powerlaw_evals(alpha, 3000, rng)
    met = esd.compute_metrics(lam, 6000, 3000)
    for key in ("alpha_ks", "alpha_median", "alpha_peak"):
        assert met[key] == pytest.approx(alpha, rel=0.05), key
    assert met["ks_distance"] < 0.05


def test_hill_alpha_end_to_end_from_a_matrix_with_power_law_singular_values():
    rng = np.random.default_rng(3)
    n, alpha = 800, 2.5
    s = np.sqrt(powerlaw_evals(alpha, n, rng))
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    W = torch.tensor((U * s) @ V.T, dtype=torch.float32)
    for method in ("gram", "svd"):
        ev = stream.compute_eigenvalues(W, method, "cpu")
        met = esd.compute_metrics(ev, n, n)
        assert met["alpha_ks"] == pytest.approx(alpha, rel=0.05), method


def test_ks_scan_picks_the_minimum_distance_candidate():
    rng = np.random.default_rng(0)
    lam = np.sort(np.concatenate([rng.uniform(0.01, 0.1, 400), powerlaw_evals(3.0, 400, rng)]))
    alphas, Ds = esd.compute_hill_scan(lam)
    fit = esd.compute_powerlaw(lam, "ks")
    b = int(np.nanargmin(Ds))
    assert fit["alpha"] == alphas[b] and fit["D"] == Ds[b] and fit["xmin"] == lam[b]
    # brute force of one candidate, straight from the definitions
    i0 = 250
    tail = lam[i0:]
    a = 1 + tail.size / np.log(tail / tail[0]).sum()
    D = np.max(np.abs(1 - (tail / tail[0]) ** (1 - a) - np.arange(tail.size) / tail.size))
    assert alphas[i0] == pytest.approx(a, rel=1e-12) and Ds[i0] == pytest.approx(D, rel=1e-12)
    # the x_min scan lands in the power-law part (above the uniform block)
    assert fit["xmin"] >= 0.09
    assert fit["alpha"] == pytest.approx(3.0, rel=0.1)


def test_stable_rank_identity_and_fixture():
    met = esd.compute_metrics(np.array([2.0, 1.0, 0.5]) ** 2, 3, 3, min_evals=2)
    assert met["stable_rank"] == pytest.approx(1.3125)
    assert met["eig_ratio"] == pytest.approx(2 / math.sqrt(1.25))
    rng = np.random.default_rng(1)
    for _ in range(5):
        W = rng.normal(size=(60, 40)) @ np.diag(rng.uniform(0.1, 3, 40))
        met = esd.compute_metrics(evals_of(W), 60, 40)
        assert met["stable_rank"] == pytest.approx(1 + 1 / met["eig_ratio"] ** 2, rel=1e-12)
        s = np.linalg.svd(W, compute_uv=False)
        assert met["spectral_norm"] == pytest.approx(s[0])
        assert met["fro_norm_sq"] == pytest.approx((W ** 2).sum())


@pytest.mark.parametrize("W", [np.zeros((30, 20)), np.outer(np.arange(1, 31), np.arange(1, 21)), np.ones((1, 50)),
                               np.full((5, 5), np.nan)], ids=["zeros", "rank_one", "1xn", "nan"])
def test_degenerate_matrices_give_nan_and_a_warning(W):
    with pytest.warns(DegenerateMatrixWarning):
        ev = stream.compute_eigenvalues(torch.tensor(W, dtype=torch.float32), "svd", "cpu") \
            if np.isfinite(W).all() else np.full(min(W.shape), np.nan)
        met = esd.compute_metrics(ev, *W.shape)
    for key in ("alpha_ks", "alpha_median", "alpha_peak", "mp_edge_fit", "num_spikes", "tw"):
        assert isinstance(met[key], float) and math.isnan(met[key]), key
    if np.isfinite(W).all() and W.any():
        assert met["stable_rank"] == pytest.approx(1.0) and met["eig_ratio"] > 1e6  # float32 rounding tail
    else:
        assert math.isnan(met["stable_rank"])


def test_gram_eigenvalues_match_svd():
    rng = np.random.default_rng(5)
    W = torch.tensor(rng.normal(size=(300, 120)) * np.logspace(0, -3, 120), dtype=torch.float32)
    a = stream.compute_eigenvalues(W, "gram", "cpu")
    b = stream.compute_eigenvalues(W, "svd", "cpu")
    c = stream.compute_eigenvalues(W.T.contiguous(), "gram", "cpu")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * b.max())
    np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-12 * b.max())


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) Llama checkpoint: streaming, adaptive ranks with peft, intervention
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # give the matrices distinct spectra so that scores differ
        for i, layer in enumerate(model.model.layers):
            for j, lin in enumerate([layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.down_proj]):
                bump = torch.outer(torch.randn(lin.out_features), torch.randn(lin.in_features))
                lin.weight += 0.2 * (i + j + 1) * bump / 8
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")  # several shards + index
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def test_spectra_table_of_a_sharded_checkpoint(tiny_llama):
    df = stream.compute_spectra(tiny_llama, "tiny", "base", device="cpu", include_embeddings=True)
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 3 * 7 + 2
    assert df.set_index(["model", "variant", "layer", "module"]).index.is_unique
    assert set(df.loc[df.layer == -1, "module"]) == {"embed_tokens", "lm_head"}
    from safetensors.torch import load_file

    state = {}
    for f in tiny_llama.glob("*.safetensors"):
        state.update(load_file(f))
    for row in df.itertuples():
        W = state[row.name]
        assert (row.shape_out, row.shape_in) == tuple(W.shape)
        s = torch.linalg.svdvals(W.double())
        assert row.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-6)
        assert row.spectral_norm == pytest.approx(float(s[0]), rel=1e-6)
    assert str(df["num_spikes"].dtype) == "Int64"
    assert df["alpha_ks"].notna().all()


def test_spectra_hold_one_tensor_at_a_time(tiny_llama, monkeypatch):
    """Streaming: when a tensor is read, no tensor read before it is still alive (so memory does not grow
    with the model), and tensors come from plain reads identical to safetensors' own loader."""
    import gc
    import weakref

    from safetensors.torch import load_file

    alive, seen = [], []
    read = stream.read_tensor

    def spy(file, name, header=None):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))
        t = read(file, name, header)
        assert torch.equal(t, load_file(file)[name])
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(stream, "read_tensor", spy)
    df = stream.compute_spectra(tiny_llama, "tiny", "base", device="cpu", include_embeddings=True)
    assert len(seen) == len(df) == 23
    assert max(seen) == 0


def adapted_modules(peft_model):
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = (mod.lora_A["default"].out_features,
                                                           mod.lora_alpha["default"], mod.scaling["default"])
    return out


@pytest.mark.parametrize("settings", [
    dict(select="heaviest", direction="light_more", scaling="linear"),
    dict(select="lightest", direction="heavy_more", scaling="log", percentile=0.3),
    dict(select="all", direction="light_more", scaling="sqrt", r_min=2, r_max=9, alpha_factor=1.5),
])
def test_adaptive_ranks_reach_every_module_of_a_real_peft_model(tiny_llama, settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    df = stream.compute_spectra(tiny_llama, "tiny", "base", device="cpu")
    ranks = adaptive.compute_adaptive_ranks(df, **settings)
    out = json.loads(json.dumps(adaptive.return_peft_config(ranks, settings=settings)))
    n_sel = len(ranks) if settings["select"] == "all" else int(len(ranks) * settings.get("percentile", 0.5))
    assert out["n_selected"] == n_sel == len(out["rank_pattern"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    all_names = [n for n, _ in model.named_modules()]
    # every pattern key, read as peft reads it, matches exactly its own module
    for key in out["rank_pattern"]:
        hits = [n for n in all_names if re.match(rf"(.*\.)?({key})$", n)]
        assert hits == [key]
    cfg = LoraConfig(r=out["r"], lora_alpha=out["lora_alpha"], target_modules=out["target_modules"],
                     rank_pattern=out["rank_pattern"], alpha_pattern=out["alpha_pattern"])
    got = adapted_modules(get_peft_model(model, cfg))
    assert set(got) == set(out["rank_pattern"])
    for name, (r, a, scaling) in got.items():
        assert r == out["rank_pattern"][name]
        assert a == out["alpha_pattern"][name]
        assert scaling == pytest.approx(a / r)
    r_min, r_max = settings.get("r_min", 4), settings.get("r_max", 64)
    assert min(out["rank_pattern"].values()) == r_min and max(out["rank_pattern"].values()) == r_max
    # direction: rank is monotone in the score, increasing for light_more, decreasing for heavy_more
    sel = ranks[ranks.selected].sort_values("score")
    diffs = np.diff(sel["rank"].to_numpy(dtype=float))
    assert (diffs >= 0).all() if settings["direction"] == "light_more" else (diffs <= 0).all()
    # selection: heaviest keeps the lowest scores
    unsel = ranks[~ranks.selected]
    if settings["select"] == "heaviest":
        assert sel["score"].max() <= unsel["score"].min()
    elif settings["select"] == "lightest":
        assert sel["score"].min() >= unsel["score"].max()


def test_adaptive_score_definition():
    df = pd.DataFrame(dict(model="m", variant="base", layer=[0, 0, 1, 1], module=["q_proj", "v_proj"] * 2,
                           name=[f"model.layers.{i}.self_attn.{m}.weight"
                                 for i in (0, 1) for m in ("q_proj", "v_proj")],
                           alpha_ks=[2.0, 4.0, 3.0, 6.0], num_spikes_mean=[10, 0, 5, 5]))
    r = adaptive.compute_adaptive_ranks(df, percentile=0.5)
    a = (df.alpha_ks - 2) / (4 + 1e-8)
    s = 1 - df.num_spikes_mean / (10 + 1e-8)
    np.testing.assert_allclose(r["score"], 0.7 * a + 0.3 * s)
    assert list(r.loc[r.selected, "module_name"]) == ["model.layers.0.self_attn.q_proj",
                                                      "model.layers.1.self_attn.q_proj"]
    assert list(r.loc[r.selected, "rank"]) == [4, 64]


def test_stable_rank_intervention(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    base_card = dict(model="tiny", label="tiny", variant="base", path=str(tiny_llama), source="test",
                     checksum="0" * 64, trust_remote_code=False)
    hf = tmp_path / "variants" / "srank-mlp-3" / "hf"
    card = intervene.make_variant(base_card, "srank-mlp-3", hf, tmp_path / "models" / "srank-mlp-3" / "model.json",
                                  tmp_path / "variants" / "srank-mlp-3" / "intervention.json")
    assert json.loads((tmp_path / "models" / "srank-mlp-3" / "model.json").read_text()) == card
    assert set(card) == {"model", "label", "variant", "path", "source", "checksum", "trust_remote_code"}
    assert (hf / "config.json").read_text() == (tiny_llama / "config.json").read_text()
    before, after = {}, {}
    for f in tiny_llama.glob("*.safetensors"):
        before.update(load_file(f))
    for f in hf.glob("*.safetensors"):
        after.update(load_file(f))
    assert set(before) == set(after)
    touched = 0
    for name, W in before.items():
        parsed = stream.parse_name(name)
        if parsed and parsed[0] >= 0 and parsed[1] in ("gate_proj", "up_proj", "down_proj"):
            touched += 1
            s0 = torch.linalg.svdvals(W.double())
            s1 = torch.linalg.svdvals(after[name].double())
            srank = float((s1 ** 2).sum() / s1[0] ** 2)
            assert abs(srank - 3.0) < 1e-4
            torch.testing.assert_close(s1[1:], s0[1:], rtol=1e-5, atol=1e-6)  # other singular values unchanged
            assert float(s1[0]) == pytest.approx(math.sqrt(float((s0[1:] ** 2).sum()) / 2.0), rel=1e-5)
        else:
            assert torch.equal(W, after[name]), name
    assert touched == 9
    summary = json.loads((tmp_path / "variants" / "srank-mlp-3" / "intervention.json").read_text())
    assert summary["max_abs_error"] < 1e-4 and len(summary["matrices"]) == 9
    # the variant is consumed like any other folder
    df = stream.compute_spectra(hf, "tiny", "srank-mlp-3", device="cpu")
    assert np.allclose(df.loc[df.module.isin(["gate_proj", "up_proj", "down_proj"]), "stable_rank"], 3.0, atol=1e-4)


def test_unreachable_intervention_target_is_refused(tiny_llama, tmp_path):
    with pytest.raises(intervene.InterventionError, match="unreachable"):
        intervene.intervene_folder(tiny_llama, tmp_path / "hf", "up", 1e6)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(intervene.InterventionError):
        intervene.parse_variant("srank-up_proj-2")
    assert intervene.variant_name("attn", 2.0) == "srank-attn-2"
    assert intervene.parse_variant("srank-mlp-1.5") == ("mlp", 1.5)


# ---------------------------------------------------------------------------------------------
# The DAG
# ---------------------------------------------------------------------------------------------

def test_dag_dry_run_builds_the_spectra_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config/ci.yaml",
                           "--until", "plot_spectra", "adaptive_ranks", "--directory", str(tmp_path),
                           "--snakefile", str(ROOT / "Snakefile")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for rule in ("intervene", "spectra", "adaptive_ranks", "plot_spectra"):
        assert re.search(rf"^{rule}\s+\d+", text, re.M), rule
    assert "srank-up-4" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")
def test_cuda_spectra_match_cpu(tiny_llama):
    rng = np.random.default_rng(2)
    W = torch.tensor(rng.normal(size=(700, 300)) * np.logspace(0, -2, 300), dtype=torch.float32)
    for method in ("svd", "gram"):
        ev = stream.compute_eigenvalues(W, method, "cuda")
        ref = stream.compute_eigenvalues(W, "gram", "cpu")
        np.testing.assert_allclose(ev, ref, rtol=1e-3, atol=1e-6 * ref.max())
    cpu = stream.compute_spectra(tiny_llama, "tiny", "base", device="cpu")
    gpu = stream.compute_spectra(tiny_llama, "tiny", "base", device="cuda")  # auto method: float32 SVD on CUDA
    for col in ("stable_rank", "alpha_ks", "alpha_median", "spectral_norm", "entropy", "mp_edge_fit"):
        np.testing.assert_allclose(gpu[col], cpu[col], rtol=1e-3, err_msg=col)
