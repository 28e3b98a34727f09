"""One extraction job over several shot counts: the weights read once, the same files as one job per
shot count, and files finished before a failed attempt taken back by the retry (Snakemake deletes every
output of a failed job)."""
import logging

import numpy as np
import pytest

from llmscape import data, extract as E, extract_job as J

PARAMS = dict(token_budget=1024, shot_order="permuted")


@pytest.fixture
def rows_pool(small_data):
    return data.load_prepared(small_data)


def outputs(folder, shots):
    return [folder / f"{k}shot.h5" for k in shots], [folder / f"{k}shot.json" for k in shots]


def test_one_job_over_shot_counts_writes_what_one_job_per_shot_count_writes(tmp_path, base_card, rows_pool,
                                                                               monkeypatch):
    rows, pool = rows_pool
    loads = []
    real_load = J.load_model
    monkeypatch.setattr(J, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    h5s, accs = outputs(tmp_path / "together", [0, 2])
    J.run(base_card, rows, pool, PARAMS, [0, 2], h5s, accs, seed=42)
    assert len(loads) == 1  # the weights read once for both shot counts
    for k, h5 in zip([0, 2], h5s, strict=True):
        alone, acc = outputs(tmp_path / f"alone{k}", [k])
        J.run(base_card, rows, pool, PARAMS, [k], alone, acc, seed=42)
        a, b = E.read_states(h5), E.read_states(alone[0])
        np.testing.assert_array_equal(a["hidden"], b["hidden"])
        np.testing.assert_array_equal(a["pred"], b["pred"])
        assert a["attrs"]["shots"] == k
    assert not list((tmp_path / "together").glob(".*.kept"))  # a job that succeeds keeps no second names


def test_a_retry_takes_back_what_the_failed_attempt_finished(tmp_path, base_card, rows_pool, monkeypatch, caplog):
    """The most shots run first (a prompt past the context stops the job before any file is written);
    a job killed at its last shot count keeps the others."""
    rows, pool = rows_pool
    h5s, accs = outputs(tmp_path, [0, 2])
    real_extract = J.extract
    done = []

    def dies_at_zero_shots(card, rows, pool, cfg, *a, **k):
        if cfg.shots == 0:
            raise RuntimeError("killed (test): the job's time ran out at 0 shots")
        done.append(cfg.shots)
        return real_extract(card, rows, pool, cfg, *a, **k)

    monkeypatch.setattr(J, "extract", dies_at_zero_shots)
    with pytest.raises(RuntimeError, match="time ran out"):
        J.run(base_card, rows, pool, PARAMS, [0, 2], h5s, accs, seed=42)
    assert done == [2]
    first = E.read_states(h5s[1])["hidden"]
    for p in h5s + accs:  # what Snakemake does to the outputs of a failed job
        p.unlink(missing_ok=True)
    assert J.kept_name(h5s[1]).exists() and J.kept_name(accs[1]).exists()

    monkeypatch.setattr(J, "extract", real_extract)
    caplog.set_level(logging.INFO, logger="llmscape")
    J.run(base_card, rows, pool, PARAMS, [0, 2], h5s, accs, seed=42)
    assert "2shot.h5: finished by an earlier attempt of this job, taken back" in caplog.text
    assert "0shot.h5: finished" not in caplog.text
    np.testing.assert_array_equal(E.read_states(h5s[1])["hidden"], first)
    assert all(p.exists() for p in h5s + accs) and not list(tmp_path.glob(".*.kept"))


def test_a_file_kept_from_other_settings_is_extracted_again(tmp_path, base_card, rows_pool, monkeypatch, caplog):
    rows, pool = rows_pool
    h5s, accs = outputs(tmp_path, [0, 2])
    J.run(base_card, rows, pool, PARAMS, [2], h5s[1:], accs[1:], seed=42)
    J.keep([h5s[1], accs[1]])  # as a failed attempt with seed 42 would leave it
    caplog.set_level(logging.INFO, logger="llmscape")
    J.run(base_card, rows, pool, PARAMS, [0, 2], h5s, accs, seed=7)  # the retry runs with another seed
    assert "other settings or damaged" in caplog.text and "taken back" not in caplog.text
    assert E.read_states(h5s[1])["attrs"]["seed"] == 7
