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


def three_geometry_files(folder: Path) -> tuple[Path, Path, Path]:
    """The files of one geometry job as the paired-differences rule reads them (table, subsample values,
    neighbour lists with their question ids and the record of the subsamples)."""
    stem = folder / "0shot"
    table, boot, knn = Path(f"{stem}.parquet"), Path(f"{stem}_boot.parquet"), Path(f"{stem}_knn.npz")
    write_parquet(table, pd.DataFrame(dict(layer=np.arange(30), ari=np.linspace(0, 1, 30))))
    write_parquet(boot, pd.DataFrame(dict(layer=np.repeat(np.arange(30), 20), draw=np.tile(np.arange(20), 30))))
    write_knn(knn, dict(question_id=np.arange(50), draws_digest=np.array("d" * 64),
                        knn=np.arange(30 * 50 * 8).reshape(30, 50, 8)))
    return table, boot, knn


@pytest.mark.parametrize("which", [0, 1, 2])
def test_the_paired_rule_names_a_damaged_geometry_file(tmp_path, which):
    from llmscape.geometry import paired

    files = three_geometry_files(tmp_path)
    intact = paired.read_extraction(*files, variant="base", shots=0)
    assert intact.question_id.tolist() == list(range(50)) and intact.draws_digest == "d" * 64
    assert len(intact.table) == 30 and len(intact.boot) == 600
    truncate(files[which])
    kind = "an .npz archive" if which == 2 else "a parquet table"
    with pytest.raises(DamagedFileError, match=f"{files[which]} cannot be read as {kind}.*{REBUILD} {files[which]}"):
        paired.read_extraction(*files, variant="base", shots=0)


def test_a_damaged_spectra_table_is_named_where_srank_calibrated_reads_it(tmp_path):
    from llmscape.finetune import srank_calibrated as m
    from llmscape.finetune.common import Context

    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    table = tmp_path / "base.parquet"
    write_parquet(table, pd.DataFrame(dict(variant="base", name=[n + ".weight" for n in names],
                                           stable_rank=[4.0, 3.0, 2.0, 1.0])))
    ctx = Context(inputs={"sranks": str(table)})
    assert m.stable_ranks(names, ctx) == dict(zip(names, [4.0, 3.0, 2.0, 1.0], strict=True))
    truncate(table)
    with pytest.raises(DamagedFileError, match=f"{table} cannot be read as a parquet table.*{REBUILD} {table}"):
        m.stable_ranks(names, ctx)


@pytest.mark.parametrize("damage", [b"", b'{"path": "/models/x", "checks'])
def test_an_empty_or_truncated_model_card_names_the_file(tmp_path, damage):
    from llmscape import models

    card = tmp_path / "model.json"
    card.write_bytes(damage)
    with pytest.raises(DamagedFileError, match=f"{card} cannot be read as JSON.*{REBUILD} {card}"):
        models.read_card(card)


def test_an_empty_table_of_the_join_names_the_file(tmp_path):
    from llmscape.io import read_csv

    table = tmp_path / "variants.csv"
    table.write_text("")
    with pytest.raises(DamagedFileError, match=f"{table} cannot be read as a CSV table.*{REBUILD} {table}"):
        read_csv(table)


#: raw readers of tables and arrays: a damaged file read with them is a library's traceback without its name
RAW_READERS = {("pd", "read_parquet"), ("pandas", "read_parquet"), ("pd", "read_csv"), ("pandas", "read_csv"),
               ("np", "load"), ("numpy", "load"), ("pq", "read_table")}
#: the only places allowed to use them, and why
RAW_ALLOWED = {
    "src/llmscape/io.py": "the checked readers themselves",
    "src/llmscape/data.py": "MMLU's own CSV files, checked row by row (the file and the row named)",
    "scripts/image_check.py": "compares two finished result trees file by file; a damaged file is a difference",
}


def test_the_pipeline_reads_its_own_files_through_the_checked_readers():
    """Every rule script and library module reads parquet, CSV, .npy and .npz files with llmscape.io's
    readers, which name a damaged file and the command that rebuilds it."""
    import ast

    root = Path(__file__).resolve().parents[1]
    raw = []
    for path in sorted([*root.joinpath("src", "llmscape").rglob("*.py"), *root.joinpath("scripts").glob("*.py")]):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            func = getattr(node, "func", None) if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in RAW_READERS and rel not in RAW_ALLOWED:
                raw.append(f"{rel}:{node.lineno} {func.value.id}.{func.attr}")
    assert raw == [], "read with llmscape.io's checked readers instead: " + ", ".join(raw)
    assert all((root / rel).exists() for rel in RAW_ALLOWED)
