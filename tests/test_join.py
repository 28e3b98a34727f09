"""Join stage on constructed tables (no other stage's code): row-count checks with a known missing layer,
correlations with a known monotone relationship, the depth-partial correlation, and the figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from llmscape.join import correlate, plots, tables
from llmscape.join.columns import DECODER_MODULES, GEOMETRY_METRICS, JoinError, spec_col

N_BLOCKS = 8
SHOTS = (0, 2)
VARIANTS = ("base", "ft-lora-r8-lr0.001-s0", "srank-up-2", "srank-up-4")


def make_spectra(variants=VARIANTS, n_blocks=N_BLOCKS, seed=0) -> pd.DataFrame:
    """One row per (variant, block, module) plus embeddings; stable_rank rises with the block index."""
    rng = np.random.default_rng(seed)
    rows = []
    for vi, v in enumerate(variants):
        for b in range(n_blocks):
            for mi, m in enumerate(DECODER_MODULES):
                sr = 5.0 + 3.0 * b + 0.1 * mi + 0.5 * vi
                if v.startswith("srank-up") and m == "up_proj":
                    sr = float(v.rsplit("-", 1)[1])
                rows.append(dict(model="toy", variant=v, layer=b, module=m, name=f"model.layers.{b}.{m}.weight",
                                 shape_out=64, shape_in=32, stable_rank=sr, eig_ratio=1 / math.sqrt(sr - 1),
                                 alpha_ks=2.0 + rng.random(), log_norm=1.0 + 0.01 * b, num_spikes=pd.NA,
                                 seconds=0.01))
        rows.append(dict(model="toy", variant=v, layer=-1, module="embed_tokens", name="model.embed_tokens.weight",
                         shape_out=100, shape_in=32, stable_rank=3.0, eig_ratio=0.7, alpha_ks=3.0, log_norm=2.0,
                         num_spikes=pd.NA, seconds=0.1))
    df = pd.DataFrame(rows)
    df["num_spikes"] = df["num_spikes"].astype("Int64")
    return df


def make_geometry(variants=VARIANTS, shots=SHOTS, n_blocks=N_BLOCKS, seed=1) -> pd.DataFrame:
    """Layers 0..n_blocks; id_gride is an increasing function of the producing block's stable rank."""
    rng = np.random.default_rng(seed)
    rows = []
    for vi, v in enumerate(variants):
        for k in shots:
            for layer in range(n_blocks + 1):
                row = dict(model="toy", variant=v, shots=k, layer=layer, layer_name=f"l{layer}", status="ok",
                           n_points=90)
                for c in GEOMETRY_METRICS:
                    row[c] = rng.random()
                sr_all = np.mean([5.0 + 3.0 * (layer - 1) + 0.1 * mi + 0.5 * vi for mi in range(7)])
                row["id_gride"] = np.log(sr_all) ** 3 if layer > 0 else 1.0  # monotone, non-linear
                row["id_2nn"] = -sr_all + 0.3 * rng.standard_normal() if layer > 0 else 0.0
                row["n_clusters"] = 4  # constant: correlations must be NaN, not an error
                rows.append(row)
    return pd.DataFrame(rows)


def make_meta(variants=VARIANTS) -> pd.DataFrame:
    ft = {"ft-lora-r8-lr0.001-s0": dict(
        run="ft-lora-r8-lr0.001-s0", method="lora",
        spec=dict(method="lora", lr=0.001, seed=0, rank=8, value_lr_ratio=None, options=dict(alpha=16)),
        trainable_params=12345, total_params=134515008, trainable_share=12345 / 134515008,
        accuracy=dict(accuracy=0.4, n=10), steps=30, train_time_s=10.0, wall_time_s=11.0,
        train_loss=[dict(step=s, loss=2.0 - 0.03 * s, lr=1e-3) for s in range(1, 31)],
        val_loss=[dict(step=s, loss=2.0 - 0.01 * s) for s in (10, 20, 30)])}
    return tables.variant_table(variants, finetune=ft, interventions={}, total_params=134515008), ft


def make_accuracy(variants=VARIANTS, shots=SHOTS) -> pd.DataFrame:
    return pd.DataFrame([dict(variant=v, shots=k, accuracy=0.3 + 0.05 * i + 0.01 * k, accuracy_nospace=0.25)
                         for i, v in enumerate(variants) for k in shots])


def make_trajectories() -> pd.DataFrame:
    _, ft = make_meta()
    run = "ft-lora-r8-lr0.001-s0"
    ck = {}
    for step, scale in ((1, 1.0), (10, 1.5), (20, 2.0), (30, 2.5)):
        s = make_spectra([f"{run}-step{step}"])
        s["eig_ratio"] = s["eig_ratio"] * scale
        ck[(run, step)] = s
    return correlate.trajectories(ck, ft, window=10, base_spectra=make_spectra(["base"]))


def joined_table(**kw):
    meta, _ = make_meta()
    return tables.join_model(make_geometry(), make_spectra(), meta, make_accuracy(), variants=VARIANTS,
                             shots=SHOTS, **kw)


# ---------------------------------------------------------------------------------------------- joins


def test_join_shape_columns_and_producer_matching():
    j = joined_table()
    assert len(j) == len(VARIANTS) * len(SHOTS) * (N_BLOCKS + 1)
    assert not j.duplicated(["variant", "shots", "layer"]).any()
    for c in ("method", "trainable_params", "lr", "rank", "accuracy", "ft_accuracy", "srank_target", "depth", "block"):
        assert c in j.columns
    for m in list(DECODER_MODULES) + ["attn", "mlp", "all"]:
        for s in ("mean", "median"):
            assert spec_col("stable_rank", m, s) in j.columns
    assert spec_col("seconds", "all", "mean") not in j.columns  # bookkeeping is not a metric
    b = j[(j["variant"] == "base") & (j["shots"] == 0)].set_index("layer")
    # producer: layer l <- block l-1; layer 0 has no block and NaN spectra, but is kept
    assert pd.isna(b.loc[0, "block"]) and np.isnan(b.loc[0, spec_col("stable_rank", "q_proj", "mean")])
    assert b.loc[3, "block"] == 2
    assert b.loc[3, spec_col("stable_rank", "q_proj", "mean")] == pytest.approx(5.0 + 3.0 * 2)
    mlp = [5.0 + 6.0 + 0.1 * i for i in (4, 5, 6)]
    assert b.loc[3, spec_col("stable_rank", "mlp", "mean")] == pytest.approx(np.mean(mlp))
    assert b.loc[3, spec_col("stable_rank", "mlp", "median")] == pytest.approx(np.median(mlp))
    assert b.loc[N_BLOCKS, "block"] == N_BLOCKS - 1
    s = j[(j["variant"] == "srank-up-4") & (j["layer"] == 5)].iloc[0]
    assert s["method"] == "srank-intervention" and s["srank_group"] == "up" and s["srank_target"] == 4.0
    assert s[spec_col("stable_rank", "up_proj", "mean")] == 4.0
    f = j[j["variant"] == "ft-lora-r8-lr0.001-s0"].iloc[0]
    assert f["method"] == "lora" and f["trainable_params"] == 12345 and f["rank"] == 8 and f["ft_accuracy"] == 0.4
    assert json.loads(f["options"]) == {"alpha": 16}
    assert j.loc[j["variant"] == "base", "trainable_params"].eq(0).all()


def test_consumer_matching_leaves_final_norm_unmatched():
    j = joined_table(layer_match="consumer")
    b = j[(j["variant"] == "base") & (j["shots"] == 2)].set_index("layer")
    assert b.loc[0, "block"] == 0 and pd.isna(b.loc[N_BLOCKS, "block"])
    assert len(j) == len(VARIANTS) * len(SHOTS) * (N_BLOCKS + 1)
    with pytest.raises(JoinError, match="layer_match"):
        tables.block_of_layer(1, N_BLOCKS, "sideways")


def test_missing_geometry_layer_is_a_clear_error():
    g = make_geometry()
    g = g[~((g["variant"] == "srank-up-2") & (g["shots"] == 2) & (g["layer"] == 4))]
    meta, _ = make_meta()
    with pytest.raises(JoinError, match=r"geometry layers missing.*srank-up-2/2shot layer 4"):
        tables.join_model(g, make_spectra(), meta, make_accuracy(), variants=VARIANTS, shots=SHOTS)


def test_missing_spectra_block_or_module_is_a_clear_error():
    meta, _ = make_meta()
    s = make_spectra()
    s1 = s[~((s["variant"] == "ft-lora-r8-lr0.001-s0") & (s["layer"] == 3) & (s["module"] == "v_proj"))]
    missing = r"spectra missing for \(variant, block, module\).*ft-lora-r8-lr0.001-s0', 3, 'v_proj"
    with pytest.raises(JoinError, match=missing):
        tables.join_model(make_geometry(), s1, meta, make_accuracy(), variants=VARIANTS, shots=SHOTS)
    s2 = s[s["layer"] != N_BLOCKS - 1]  # the last block gone everywhere: the geometry has one layer too many
    with pytest.raises(JoinError, match=rf"spectra missing block\(s\) \[{N_BLOCKS - 1}\]"):
        tables.join_model(make_geometry(), s2, meta, make_accuracy(), variants=VARIANTS, shots=SHOTS)


def test_missing_variant_shots_accuracy_and_metadata_are_errors():
    meta, _ = make_meta()
    g = make_geometry()
    with pytest.raises(JoinError, match=r"geometry missing for \(variant, shots\).*srank-up-4', 0"):
        tables.join_model(g[~((g["variant"] == "srank-up-4") & (g["shots"] == 0))], make_spectra(), meta,
                          make_accuracy(), variants=VARIANTS, shots=SHOTS)
    a = make_accuracy()
    with pytest.raises(JoinError, match=r"extraction accuracy missing.*base', '2"):
        tables.join_model(g, make_spectra(), meta, a[~((a["variant"] == "base") & (a["shots"] == 2))],
                          variants=VARIANTS, shots=SHOTS)
    with pytest.raises(JoinError, match="variant metadata missing for srank-up-2"):
        tables.join_model(g, make_spectra(), meta[meta["variant"] != "srank-up-2"], make_accuracy(),
                          variants=VARIANTS, shots=SHOTS)
    with pytest.raises(JoinError, match="cannot say which method"):
        tables.variant_table(["mystery"])
    with pytest.raises(JoinError, match="spectra missing for variant"):
        tables.join_model(g, make_spectra()[lambda d: d["variant"] != "base"], meta, make_accuracy(),
                          variants=VARIANTS, shots=SHOTS)


def test_variants_extracted_at_fewer_shots_join_by_pairs():
    """extract.variant_shots: non-base variants at 0 shots only; the join takes (variant, shots) pairs."""
    meta, _ = make_meta()
    pairs = [("base", 0), ("base", 2)] + [(v, 0) for v in VARIANTS[1:]]
    g, a = make_geometry(), make_accuracy()
    keep_g = [(v, int(k)) in set(pairs) for v, k in zip(g["variant"], g["shots"], strict=True)]
    keep_a = [(v, int(k)) in set(pairs) for v, k in zip(a["variant"], a["shots"], strict=True)]
    j = tables.join_model(g[keep_g], make_spectra(), meta, a[keep_a], variants=VARIANTS, shots=SHOTS, pairs=pairs)
    assert len(j) == len(pairs) * (N_BLOCKS + 1)
    assert set(zip(j["variant"], j["shots"], strict=True)) == set(pairs)
    with pytest.raises(JoinError, match=r"geometry missing for \(variant, shots\)"):
        tables.join_model(g[keep_g], make_spectra(), meta, a[keep_a], variants=VARIANTS, shots=SHOTS,
                          pairs=pairs + [("srank-up-2", 2)])


# ---------------------------------------------------------------------------------------------- correlations


def test_known_monotone_relationship():
    j = joined_table()
    sr = spec_col("stable_rank", "all", "mean")
    c = correlate.layer_correlations(j, [sr, spec_col("alpha_ks", "all", "mean")], n_boot=200, seed=3)
    base = c[(c["scope"] == "base") & (c["shots"] == 0) & (c["spectral"] == sr)].set_index(["geometry", "method"])
    # id_gride = log(sr)^3: strictly increasing, not linear -> Spearman exactly 1, Pearson below 1
    assert base.loc[("id_gride", "spearman"), "r"] == pytest.approx(1.0)
    assert base.loc[("id_gride", "spearman"), "n"] == N_BLOCKS  # layer 0 has no block: dropped pairwise
    assert 0.9 < base.loc[("id_gride", "pearson"), "r"] < 1.0 - 1e-4
    assert base.loc[("id_gride", "spearman"), "ci_low"] == pytest.approx(1.0)
    # id_2nn = -sr + noise: strongly negative, the bootstrap CI excludes 0 and contains r
    row = base.loc[("id_2nn", "pearson")]
    assert row["r"] < -0.99 and row["ci_low"] <= row["r"] <= row["ci_high"] < 0
    assert row["n_boot_ok"] == 200
    # constant geometry: NaN, not an error
    assert np.isnan(base.loc[("n_clusters", "spearman"), "r"])
    # the pooled scope and the parsed column parts
    assert {"pooled", *VARIANTS} == set(c["scope"])
    assert set(c.loc[c["spectral"] == sr, "module"]) == {"all"}
    # same seed -> same CIs
    c2 = correlate.layer_correlations(j, [sr], n_boot=200, seed=3)
    m = c.merge(c2, on=["scope", "shots", "spectral", "geometry", "method"])
    np.testing.assert_allclose(m["ci_low_x"].to_numpy(), m["ci_low_y"].to_numpy(), rtol=0, atol=1e-12)


def test_correlation_matches_scipy_and_partial_removes_depth():
    rng = np.random.default_rng(0)
    depth = np.arange(40, dtype=float)
    noise_x, noise_y = rng.standard_normal(40), rng.standard_normal(40)
    x = depth + 3 * noise_x  # both driven by depth, independent otherwise
    y = depth + 3 * noise_y
    r, p, n = correlate.correlation(x, y, "pearson")
    assert (r, p) == pytest.approx(tuple(stats.pearsonr(x, y))) and n == 40
    assert r > 0.6
    pr, pp, _ = correlate.partial_correlation(x, y, depth, "pearson")
    assert abs(pr) < 0.35 and pp > 0.05
    D = np.c_[np.ones(40), depth]  # least-squares residuals on depth, computed independently
    res_x = x - D @ np.linalg.lstsq(D, x, rcond=None)[0]
    res_y = y - D @ np.linalg.lstsq(D, y, rcond=None)[0]
    assert pr == pytest.approx(np.corrcoef(res_x, res_y)[0, 1], abs=1e-12)
    # a relationship beyond depth survives
    y2 = depth + 3 * noise_x + 0.5 * noise_y
    pr2, pp2, _ = correlate.partial_correlation(x, y2, depth, "spearman")
    assert pr2 > 0.8 and pp2 < 1e-6
    # NaNs are dropped pairwise
    x3 = x.copy()
    x3[:5] = np.nan
    assert correlate.correlation(x3, y, "spearman")[2] == 35
    # the batched bootstrap agrees with scipy on the un-resampled data
    idx = np.arange(40)[None]
    rb = correlate._batched_corr(np.c_[x][None][:, idx[0]], np.c_[y][None][:, idx[0]], None, True)
    assert rb[0, 0, 0] == pytest.approx(stats.spearmanr(x, y)[0])


def test_deltas_interventions_and_trajectories():
    j = joined_table()
    sr_up = spec_col("stable_rank", "up_proj", "mean")
    d = correlate.variant_deltas(j, [sr_up, "id_gride"])
    assert set(d["variant"]) == set(VARIANTS) - {"base"}
    row = d[(d["variant"] == "srank-up-4") & (d["shots"] == 0) & (d["layer"] == 2)].iloc[0]
    assert row[f"d:{sr_up}"] == pytest.approx(4.0 - (5.0 + 3.0 * 1 + 0.1 * 5))  # layer 2 <- block 1
    assert row["d:accuracy"] == pytest.approx(0.15)
    dc = correlate.delta_correlations(d, [sr_up], ["id_gride"], n_boot=50)
    assert {"across_variants", "across_layers"} == set(dc["scope"])
    assert (dc.loc[dc["scope"] == "across_variants", "n"] == 3).all()

    j.loc[j["variant"] == "srank-up-4", "accuracy"] = 0.35  # accuracy 0.40, 0.35, 0.30 at stable rank 2, 4, base
    iv = correlate.intervention_table(j)
    assert set(iv["variant"]) == {"base", "srank-up-2", "srank-up-4"} and set(iv["group"]) == {"up"}
    assert iv.loc[iv["variant"] == "srank-up-2", "stable_rank"].iloc[0] == pytest.approx(2.0)
    eff = correlate.intervention_effects(iv)
    acc = eff[(eff["y"] == "accuracy") & (eff["method"] == "spearman") & (eff["shots"] == 0)].iloc[0]
    # accuracy falls as the measured stable rank rises (2 -> 4 -> base's ~16.5)
    assert acc["r"] == pytest.approx(-1.0) and acc["n"] == 3 and acc["slope"] < 0
    assert iv.loc[iv["variant"] == "base", "stable_rank"].iloc[0] == pytest.approx(5.0 + 3.0 * 3.5 + 0.5)

    tr = make_trajectories()
    assert set(tr["step"]) == {0, 1, 10, 20, 30}
    t10 = tr[(tr["step"] == 10) & (tr["module"] == "all")].iloc[0]
    assert t10["train_loss"] == pytest.approx(np.mean([2.0 - 0.03 * s for s in range(1, 11)]))
    assert t10["val_loss"] == pytest.approx(1.9) and t10["gap"] == pytest.approx(1.9 - t10["train_loss"])
    assert np.isnan(tr.loc[tr["step"] == 1, "gap"]).all()  # before the first evaluation: no extrapolation
    tc = correlate.trajectory_correlations(tr)
    r = tc[(tc["module"] == "all") & (tc["method"] == "spearman")].iloc[0]
    assert r["n"] == 3 and r["r"] == pytest.approx(1.0)  # the gap grows with step, as does eig_ratio here


# ---------------------------------------------------------------------------------------------- figures


def test_figures_are_written_and_non_empty(tmp_path):
    j = joined_table()
    spectral = [spec_col(m, "all", "mean") for m in ("stable_rank", "alpha_ks", "eig_ratio")]
    c = correlate.layer_correlations(j, spectral, n_boot=20)
    summary = tables.variants_summary(j)
    j.loc[j["variant"] == "srank-up-4", "accuracy"] = 0.35  # accuracy 0.40, 0.35, 0.30 at stable rank 2, 4, base
    iv = correlate.intervention_table(j)
    paths = [
        plots.correlation_heatmap(c, tmp_path / "heat.png"),
        plots.id_alpha_overlay(j, tmp_path / "id_alpha.png"),
        plots.ari_panels(j, tmp_path / "ari.png"),
        plots.accuracy_vs_trainable(summary, tmp_path / "acc.png"),
        plots.intervention_plot(iv, tmp_path / "iv.png"),
        plots.trajectory_plot(make_trajectories(), tmp_path / "traj.png"),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 5000, p
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # with fine-tuning variants or checkpoints absent the figures say so instead of failing
    empty = plots.accuracy_vs_trainable(summary[summary["method"] == "base"], tmp_path / "acc_empty.png")
    assert empty.stat().st_size > 1000
    assert plots.trajectory_plot(pd.DataFrame(columns=["module"]), tmp_path / "traj_empty.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp*"))


# ---------------------------------------------------------------------------------------------- rules + report

RUN = "ft-lora-r8-lr0.001-s0"
CKPT_STEPS = (1, 3, 10, 30)  # finetune.train max_steps 30, n_checkpoints 4: geomspace(1, 30, 4) rounded


def write_constructed_inputs(workdir, model="toy"):
    """The files the join rules read, as the other stages would write them, from the constructed tables."""
    from llmscape.io import write_json, write_parquet

    res = workdir / "results"
    geom, spec, acc = make_geometry(), make_spectra(), make_accuracy()
    geom["model"], spec["model"] = model, model
    for v in VARIANTS:
        write_parquet(res / "spectra" / model / f"{v}.parquet", spec[spec["variant"] == v])
        for k in SHOTS:
            write_parquet(res / "geometry" / model / v / f"{k}shot.parquet",
                          geom[(geom["variant"] == v) & (geom["shots"] == k)])
            a = acc[(acc["variant"] == v) & (acc["shots"] == k)].iloc[0]
            write_json(res / "reps" / model / v / f"{k}shot.json",
                       dict(accuracy=a.accuracy, accuracy_nospace=a.accuracy_nospace))
    _, ft = make_meta()
    write_json(res / "finetune" / model / RUN / "metrics.json", ft[RUN])
    for v in VARIANTS:
        if v.startswith("srank-"):
            write_json(res / "variants" / model / v / "intervention.json",
                       dict(group="up", target=float(v.rsplit("-", 1)[1])))
    for i, step in enumerate(CKPT_STEPS):
        s = make_spectra([f"{RUN}-step{step}"])
        s["model"] = model
        s["eig_ratio"] *= 1 + 0.2 * i
        write_parquet(res / "spectra" / model / f"{RUN}-step{step}.parquet", s)


def join_test_config(workdir, root):
    """The real workflow with a config whose variants, runs and checkpoints are exactly the constructed
    inputs' (the CI config plus overrides); only the join rules may run (--allowed-rules), every other
    input exists already. Returns the config file to pass."""
    import yaml

    cfg = yaml.safe_load((root / "config" / "ci.yaml").read_text())
    cfg["model_label"] = "toy"
    cfg["extract"]["variant_shots"] = None  # every variant at every shot, as the constructed tables
    cfg["spectra"]["intervene"] = dict(groups=["up"], targets=[2, 4])
    cfg["finetune"]["sweeps"] = [dict(method="lora", rank=[8], lr=[1e-3], seed=[0])]
    cfg["finetune"]["train"].update(max_steps=30, n_checkpoints=len(CKPT_STEPS))
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_join_rules_and_report_end_to_end(tmp_path, root):
    import subprocess
    import sys

    from llmscape.join.report import JOIN_ENTRIES, JOIN_RULES, check_report

    write_constructed_inputs(tmp_path)
    cfg = join_test_config(tmp_path, root)
    base = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(cfg), "--config", f"resources_dir={root / 'resources'}"]  # shots 0 and 2 = SHOTS
    # --allowed-rules takes every following word: keep it last
    allowed = ["--allowed-rules", "join_tables", "correlate", "plot_join", "join_config", "join_all"]
    run = subprocess.run(base + ["--cores", "1", "join_all", *allowed], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "results" / "join" / "toy"
    j = pd.read_parquet(out / "joined.parquet")
    assert len(j) == len(VARIANTS) * len(SHOTS) * (N_BLOCKS + 1)
    assert set(j["method"]) == {"base", "lora", "srank-intervention"}
    tr = pd.read_parquet(out / "trajectories.parquet")
    assert set(tr["step"]) == {0, *CKPT_STEPS}
    for fig in out.glob("figures/*.png"):
        assert fig.stat().st_size > 5000, fig
    assert len(list(out.glob("figures/*.png"))) == 6
    rep = subprocess.run(base + ["--cores", "1", "join_all", "--report", str(tmp_path / "report.html"), *allowed],
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert check_report(tmp_path / "report.html", JOIN_ENTRIES, JOIN_RULES) == []  # the join rules only ran
    assert check_report(tmp_path / "report.html") != []  # the whole DAG's report would hold the paired entries
    assert check_report(tmp_path / "nothing.html") != []  # the check itself can fail
