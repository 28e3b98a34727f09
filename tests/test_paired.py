"""Paired differences of the geometry (same questions, same subsamples) and the paired accuracy test
(src/llmscape/geometry/paired.py), on extractions the real geometry pipeline computes."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.stats import binomtest

from llmscape import geometry as G
from llmscape.geometry import paired
from llmscape.integrity import seal
from llmscape.io import write_parquet
from llmscape.join import plots
from test_geometry import write_h5

ROOT = Path(__file__).resolve().parents[1]
# 4 subjects x 40 points: scales small enough that every class is resolved, 20 subsamples
P = G.GeometryParams(maxk=60, id_range_max=16, id_scale=4, density_k=8, overlap_k=8, device="cpu", n_boot=20,
                     block_rows=512)
NON_DENSITY = [m for m in paired.PAIRED_METRICS if m != "log_density_mean"]


def blobs(n_per=40, n_blobs=4, dim=12, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * sep
    y = np.repeat(np.arange(n_blobs), n_per)
    return (centres[y] + rng.standard_normal((y.size, dim))).astype(np.float32), y


X, Y = blobs()
SUBJECTS = np.array([f"s{c}" for c in Y], dtype=object)
ANSWERS = np.random.default_rng(1).integers(0, 4, Y.size)


def geometry_files(folder: Path, name: str, hidden: np.ndarray, *, params=P, question_id=None,
                   digest: bool = True) -> paired.Extraction:
    """Run the geometry on a synthetic extraction and read it back as the paired rule does."""
    folder.mkdir(parents=True, exist_ok=True)
    h5 = write_h5(folder / f"{name}.h5", hidden, SUBJECTS, ANSWERS, question_id=question_id, variant=name)
    with h5py.File(h5, "a") as f:  # the second scoring of a real extraction
        f.create_dataset("pred_nospace", data=f["pred"][:])
        seal(f)  # its checksum too, as extract() writes it
    r = G.compute_geometry(h5, params, model="toy", variant=name, shots=0)
    stem = folder / name
    knn = r.knn if digest else {k: v for k, v in r.knn.items() if k != "draws_digest"}
    write_parquet(f"{stem}.parquet", r.table)
    write_parquet(f"{stem}_boot.parquet", r.boot)
    G.write_knn(f"{stem}_knn.npz", knn)
    return paired.read_extraction(f"{stem}.parquet", f"{stem}_boot.parquet", f"{stem}_knn.npz", variant=name,
                                  shots=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # layer 1 is layer 0 times 2: float32 scaling by a power of two is exact, so every distance doubles
    return geometry_files(tmp_path_factory.mktemp("base"), "base", np.stack([X, 2 * X]))


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    # every distance 5% longer: the kNN log density falls by ID x log(1.05), the rest is unchanged
    return geometry_files(tmp_path_factory.mktemp("scaled"), "scaled", np.stack([1.05 * X, 2.1 * X]))


def test_difference_of_an_extraction_with_itself_is_exactly_zero(base):
    d = paired.compute_pair_differences(base, base, "variant", model="toy")
    assert len(d) == 2 * len(paired.PAIRED_METRICS)
    has = np.isfinite(d["value"])
    assert has.sum() >= 2 * len(NON_DENSITY)  # everything but the last layer's overlap with a next one
    assert (d.loc[has, ["diff", "diff_lo", "diff_hi"]].to_numpy() == 0.0).all()
    assert (d.loc[has, "verdict"] == paired.NO_DIFFERENCE).all()
    assert (d.loc[has, "n_boot"] == P.n_boot).all()
    assert (d.loc[~has, "verdict"] == paired.UNDETERMINED).all()


def test_a_known_shift_is_detected_where_the_marginal_intervals_overlap(base, scaled):
    d = paired.compute_pair_differences(scaled, base, "variant", model="toy").set_index(["layer", "metric"])
    for layer in (0, 1):
        row = d.loc[(layer, "log_density_mean")]
        known = -float(base.table.loc[layer, "id_gride"]) * math.log(1.05)
        assert row["diff"] == pytest.approx(known, rel=1e-4)
        assert row["diff_hi"] < 0 and row["verdict"] == paired.LOWER
        # the marginal intervals overlap: only the pairing separates the two
        a, b = base.table.loc[layer], scaled.table.loc[layer]
        lo, hi = "log_density_mean_lo", "log_density_mean_hi"
        assert a[lo] < b[hi] and b[lo] < a[hi]
        assert 0 < row["diff_hi"] - row["diff_lo"] < 0.25 * (a[hi] - a[lo])
        for m in ("id_gride", "id_2nn", "ari_subjects", "overlap_subjects"):
            assert d.loc[(layer, m), "verdict"] == paired.NO_DIFFERENCE, m


def test_each_layer_is_compared_with_the_one_before_on_the_same_draws(base):
    d = paired.compute_layer_differences(base, model="toy").set_index("metric")
    assert set(d["layer"]) == {1} and set(d["ref_layer"]) == {0} and set(d["comparison"]) == {"layer"}
    same = [m for m in NON_DENSITY if m != "overlap_next_layer"]  # the last layer has no next one
    assert (d.loc[same, ["diff", "diff_lo", "diff_hi"]].to_numpy() == 0.0).all()
    known = -float(base.table.loc[0, "id_gride"]) * math.log(2.0)
    assert d.loc["log_density_mean", "diff"] == pytest.approx(known, rel=1e-6)
    assert d.loc["log_density_mean", "verdict"] == paired.LOWER


def test_a_full_sample_difference_that_the_draws_do_not_share_is_not_claimed():
    # a cluster count one higher in the full sample while every subsample gives both sides the same count:
    # the interval is [1, 1], but no draw agrees, so no difference is claimed
    same = np.zeros(20)
    lo, hi, used = paired.difference_interval(1.0, same, 0.8, 0.95, "n_clusters")
    assert (lo, hi, used) == (1.0, 1.0, 20)
    assert paired.return_draws_agree(1.0, same) == 0.0
    assert paired.return_verdict(1.0, lo, hi, paired.return_draws_agree(1.0, same)) == paired.NO_DIFFERENCE
    mostly = np.r_[np.ones(15), np.zeros(5)]
    lo, hi, _ = paired.difference_interval(1.0, mostly, 0.8, 0.95, "n_clusters")
    assert paired.return_draws_agree(1.0, mostly) == 0.75
    assert paired.return_verdict(1.0, lo, hi, 0.75) == (paired.HIGHER if lo > 0 else paired.NO_DIFFERENCE)
    # a difference of two values in [0, 1] is clipped to [-1, 1]
    assert paired.difference_interval(0.9, [0.0, 0.5, 1.0], 0.8, 0.95, "overlap_subjects")[1] == 1.0


def test_extractions_of_other_questions_or_subsamples_are_refused(base, tmp_path):
    other = geometry_files(tmp_path, "other", np.stack([X, 2 * X]), question_id=np.arange(Y.size) + 1000)
    with pytest.raises(paired.PairingError, match="hold different questions") as e:
        paired.compute_pair_differences(other, base, "variant")
    assert str(tmp_path / "other.parquet") in str(e.value) and "base.parquet" in str(e.value)
    assert "Fix:" in str(e.value)
    reseeded = geometry_files(tmp_path, "reseeded", np.stack([X, 2 * X]), params=replace(P, seed=1))
    with pytest.raises(paired.PairingError, match="different subsamples"):
        paired.compute_pair_differences(reseeded, base, "variant")
    old = geometry_files(tmp_path, "old", np.stack([X, 2 * X]), digest=False)
    with pytest.raises(paired.PairingError, match="without the record of its subsamples"):
        paired.compute_pair_differences(old, base, "variant")


def test_mcnemar_exact_on_hand_computed_tables():
    # b = 3, c = 10: 2 x (C(13,0) + C(13,1) + C(13,2) + C(13,3)) / 2^13 = 2 x 378 / 8192
    assert paired.mcnemar_exact(3, 10) == pytest.approx(756 / 8192, rel=1e-12)
    assert paired.mcnemar_exact(0, 6) == pytest.approx(2 / 64, rel=1e-12)
    assert paired.mcnemar_exact(5, 5) == 1.0 and paired.mcnemar_exact(0, 0) == 1.0
    for b, c in [(12, 30), (40, 41), (0, 1), (250, 310)]:
        assert paired.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        paired.mcnemar_exact(-1, 3)


def answers(right: np.ndarray, qid=None) -> dict:
    n = right.size
    answer = np.zeros(n, dtype=np.int8)
    pred = np.where(right, 0, 1).astype(np.int8)
    return dict(question_id=np.arange(n) if qid is None else qid, subject=np.repeat(["a", "b", "c", "d"], n // 4),
                answer=answer, pred=pred, pred_nospace=pred, path=f"toy{int(right.sum())}.h5")


def test_accuracy_is_compared_question_by_question():
    rng = np.random.default_rng(0)
    ref = rng.random(200) < 0.3
    better = ref.copy()
    better[np.flatnonzero(~ref)[:30]] = True  # 30 more right, none lost: b = 30, c = 0
    key = dict(model="toy", variant="v", shots=0, comparison="variant", ref_variant="base", ref_shots=0)
    row = paired.compute_accuracy_difference(answers(better), answers(ref), key=key, confidence=0.95)[0]
    assert (row["only_this_right"], row["only_ref_right"]) == (30, 0)
    assert row["diff"] == pytest.approx(30 / 200) and row["p_mcnemar"] == pytest.approx(2 / 2 ** 30)
    assert 0 < row["diff_lo"] <= row["diff"] <= row["diff_hi"] and row["verdict"] == paired.HIGHER
    same = paired.compute_accuracy_difference(answers(ref), answers(ref), key=key, confidence=0.95)[0]
    assert (same["diff"], same["diff_lo"], same["diff_hi"], same["p_mcnemar"]) == (0, 0, 0, 1)
    assert same["verdict"] == paired.NO_DIFFERENCE
    with pytest.raises(paired.PairingError, match="toy.*h5 and toy.*h5 hold different questions"):
        paired.compute_accuracy_difference(answers(ref, qid=np.arange(200) + 1), answers(ref), key=key,
                                           confidence=0.95)


def test_the_model_tables_and_figures(base, scaled, tmp_path):
    """What rule geometry_paired writes: every comparison, the summary, the accuracy read from the
    extractions, and a figure per comparison (one that says so when there is nothing to compare)."""
    extractions = {("base", 0): base, ("scaled", 0): scaled}
    diffs = paired.compute_all_differences(extractions, [("scaled", 0, "variant", "base", 0)], model="toy")
    assert list(diffs.columns) == paired.DIFF_COLUMNS
    assert diffs.groupby("comparison").size().to_dict() == {"layer": 20, "variant": 20}
    s = paired.summarise_differences(diffs).set_index(["comparison", "variant", "metric"])
    assert s.loc[("variant", "scaled", "log_density_mean"), ["n_lower", "layers_lower"]].tolist() == [2, "0-1"]
    assert s.loc[("variant", "scaled", "id_gride"), "n_no_difference"] == 2
    assert paired._ranges([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    h5 = {key: Path(e.files.split(", ")[0]).with_suffix(".h5") for key, e in extractions.items()}
    acc = paired.compute_accuracy_pairs(h5, [("scaled", 0, "variant", "base", 0)], model="toy")
    assert list(acc["scoring"]) == ["space", "nospace"] and (acc["diff"] == 0).all() and (acc["p_mcnemar"] == 1).all()
    swapped = {("base", 0): h5[("scaled", 0)], ("scaled", 0): h5[("scaled", 0)]}  # a file under another's name
    with pytest.raises(G.GeometryError, match="is not the extraction its path names"):
        paired.compute_accuracy_pairs(swapped, [("scaled", 0, "variant", "base", 0)], model="toy")
    for comparison in ("variant", "layer", "shots", "shots_step"):
        out = plots.difference_bands(diffs, tmp_path / f"{comparison}.png", comparison=comparison, title="toy")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ci_dag_computes_the_paired_differences(tmp_path):
    """The rule is in the DAG that `make run` and CI build, with every comparison of the config."""
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", str(ROOT / "config/ci.yaml"),
                          "--config", f"resources_dir={ROOT / 'resources'}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rule geometry_paired:" in res.stdout and "paired_accuracy.csv" in res.stdout
