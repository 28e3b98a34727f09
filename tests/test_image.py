"""The comparison that `make image-test` runs on a local and an image run of the CI DAG
(scripts/image_check.py): equal results pass whatever their timings, and a changed state, table value,
attribute or a missing file fails naming it. The image build and the DAG runs themselves take most of
an hour and are not part of the test suite (docs/install.md has the measured run)."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def make_run(wd: Path, seconds: float, state_delta: float = 0.0, accuracy: float = 0.5) -> Path:
    """A small results tree of the kinds the DAG writes: HDF5 states, a parquet table with a timing
    column, a JSON summary with a timing key, an npz, a figure and a TensorBoard event log."""
    rng = np.random.default_rng(0)
    reps = wd / "results" / "reps" / "m" / "base"
    reps.mkdir(parents=True)
    with h5py.File(reps / "0shot.h5", "w") as f:
        f.create_dataset("hidden", data=rng.normal(size=(3, 4, 5)).astype("float32") + np.float32(state_delta))
        f.create_dataset("answer", data=np.array([0, 1, 2, 3], dtype="int8"))
        f.attrs["shots"] = 0
    (reps / "0shot.json").write_text(json.dumps({"accuracy": accuracy, "seconds": seconds,
                                                 "nested": {"wall_time_s": seconds, "n": 4}}))
    geo = wd / "results" / "geometry"
    geo.mkdir(parents=True)
    pd.DataFrame({"layer": [0, 1], "id": [3.5, np.nan], "seconds_graph": [seconds, 2 * seconds]}
                 ).to_parquet(geo / "0shot.parquet")
    np.savez(geo / "0shot_knn.npz", idx=np.arange(6).reshape(2, 3))
    (geo / "id.png").write_bytes(b"png" + str(seconds).encode())
    tb = wd / "results" / "finetune" / "tb"  # TensorBoard names its logs by wall-clock time and host
    tb.mkdir(parents=True)
    (tb / f"events.out.tfevents.{seconds}.host").write_bytes(b"event")
    return wd


def check(local: Path, image: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "image_check.py"), str(local), str(image)],
                          capture_output=True, text=True)


def test_equal_results_pass_whatever_the_timings(tmp_path):
    res = check(make_run(tmp_path / "a", 1.0), make_run(tmp_path / "b", 7.5))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 result files compared" in res.stdout and "the two runs' results are equal" in res.stdout
    assert "results/geometry/id.png" in res.stdout  # reported, not failed


def test_a_changed_state_fails_naming_the_file_and_dataset(tmp_path):
    res = check(make_run(tmp_path / "a", 1.0), make_run(tmp_path / "b", 1.0, state_delta=1e-7))
    assert res.returncode == 1
    assert "DIFFERS results/reps/m/base/0shot.h5: dataset hidden differs" in res.stdout
    assert "1 differences" in res.stdout


def test_a_changed_value_in_a_table_or_summary_fails(tmp_path):
    image = make_run(tmp_path / "b", 1.0, accuracy=0.75)
    table = image / "results" / "geometry" / "0shot.parquet"
    pd.read_parquet(table).assign(id=[3.5, 2.0]).to_parquet(table)
    res = check(make_run(tmp_path / "a", 1.0), image)
    assert res.returncode == 1
    assert "DIFFERS results/reps/m/base/0shot.json: values differ" in res.stdout
    assert "DIFFERS results/geometry/0shot.parquet:" in res.stdout


def test_a_changed_attribute_or_a_missing_file_fails(tmp_path):
    image = make_run(tmp_path / "b", 1.0)
    with h5py.File(image / "results" / "reps" / "m" / "base" / "0shot.h5", "a") as f:
        f.attrs["shots"] = 2
    (image / "results" / "geometry" / "0shot_knn.npz").unlink()
    res = check(make_run(tmp_path / "a", 1.0), image)
    assert res.returncode == 1
    assert "0shot.h5: attr /:shots differs" in res.stdout
    assert "results/geometry/0shot_knn.npz: only in the local run" in res.stdout


def test_a_folder_without_results_is_refused(tmp_path):
    res = check(make_run(tmp_path / "a", 1.0), tmp_path / "nothing")
    assert res.returncode == 2 and "usage: image_check.py LOCAL_DIR IMAGE_DIR" in res.stderr
