"""Damaged or malformed inputs name the file (and the row, or the command that rebuilds it) instead of
a library's own error: a truncated or overwritten parquet table, .npy index or .npz archive of the
pipeline, and empty or malformed MMLU CSV files. Real files, damaged as a disk or an editor would."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmscape import data
from llmscape.geometry.files import read_knn, write_knn
from llmscape.io import DamagedFileError, read_parquet, write_parquet

REBUILD = "snakemake --cores 1 --force"


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.fixture
def prepared(tmp_path, small_data) -> Path:
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    return out


@pytest.mark.parametrize("name", ["mmlu.parquet", "pool.parquet"])
def test_a_truncated_prepared_table_names_the_file_and_its_rebuild(prepared, name):
    truncate(prepared / name)
    with pytest.raises(DamagedFileError) as e:
        data.load_prepared(prepared)
    msg = str(e.value)
    assert msg.startswith(f"{prepared / name} cannot be read as a parquet table")
    assert f"{REBUILD} {prepared / name}" in msg


def test_an_empty_or_overwritten_index_names_the_file(prepared):
    index = prepared / "analysis_index.npy"
    index.write_bytes(b"")
    with pytest.raises(DamagedFileError, match=f"{index} cannot be read as an .npy array.*{REBUILD} {index}"):
        data.load_prepared(prepared)
    np.save(index, np.array([10**6]))  # a valid file from another run: ids the table does not hold
    with pytest.raises(data.DataError, match=f"{index} lists 1 question id.*{REBUILD}"):
        data.load_prepared(prepared)


def test_a_truncated_geometry_table_names_the_file(tmp_path):
    table = tmp_path / "0shot.parquet"
    write_parquet(table, pd.DataFrame(dict(layer=np.arange(30), ari=np.linspace(0, 1, 30))))
    truncate(table, 0.8)
    with pytest.raises(DamagedFileError, match=f"{table} cannot be read as a parquet table.*{REBUILD} {table}"):
        read_parquet(table)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_neighbour_archive_names_the_file(tmp_path, damage):
    path = tmp_path / "0shot_knn.npz"
    write_knn(path, dict(question_id=np.arange(50), knn=np.arange(50 * 8).reshape(50, 8)))
    if damage == "truncated":
        truncate(path)
    else:  # one byte inside the first member's data: zip's CRC-32 catches it when the member is read
        raw = bytearray(path.read_bytes())
        raw[200] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFileError, match=f"{path} cannot be read as an .npz archive.*{REBUILD} {path}"):
        read_knn(path)


def csv_folder(tmp_path: Path, bad: str) -> Path:
    """An MMLU CSV folder: one good subject and one whose test file holds ``bad``."""
    test = tmp_path / "mmlu" / "test"
    test.mkdir(parents=True)
    (test / "anatomy_test.csv").write_text("What is x?,a,b,c,d,A\nWhat is y?,a,b,c,d,B\n")
    (test / "virology_test.csv").write_text(bad)
    return tmp_path / "mmlu"


@pytest.mark.parametrize("bad, where, what", [
    ("", "virology_test.csv:", "the file is empty"),
    ("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,e,B\n", "virology_test.csv, row 2:", "Expected 6 fields in line 2, saw 7"),
    ('Q1?,a,b,c,d,A\nQ2?,a,b,c,d,B\n"Q3?,a,b,c,d,C\n', "virology_test.csv, row 3:", "EOF inside string"),
    ("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,E\n", "virology_test.csv, row 2:", "answer 'E' is not A-D"),
])
def test_an_empty_or_malformed_csv_names_the_file_and_the_row(tmp_path, bad, where, what):
    folder = csv_folder(tmp_path, bad)
    with pytest.raises(data.DataError) as e:
        data.prepare(dict(source="csv", path=str(folder), per_subject=1, pool_size=0), tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(str(folder / "test" / where)) and what in msg and "Fix:" in msg, msg
    assert not (tmp_path / "out" / "mmlu.parquet").exists()
