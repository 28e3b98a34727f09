"""The resolution rule on classes of known size (src/llmscape/geometry/resolution.py; the full study is
bench/resolution_study.py): at the rule's size, separated classes meet the rule's criterion (the subject
ARI within 0.1 of its large-sample value with probability at least 0.9); far below it they do not, however
well separated; the Gride ID at a fixed rank is not resolved by it. And the study's summary names what
its columns are."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmscape import geometry as G
from llmscape.geometry import resolution as R

ROOT = Path(__file__).resolve().parents[1]
# bench/coverage.py under its own name (the name "coverage" is also the coverage.py package's)
_spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)

#: the rule at a small scale for speed: k = 8, Gride scale (8, 16), so s = max(k, n2) = 16 points
PARAMS = G.GeometryParams(device="cpu", density_k=8, id_scale=8, n_boot=0)
SEPARATED = 12.0  # 16 unit Gaussians in 8 dimensions, class means 12 apart on the unit sphere's scale
DRAWS = 10


def _draws(tmp_path: Path, sizes: list[int], reference: int):
    """DRAWS independent samples of ``reference`` points per class, each studied by the DAG's own path
    (whole sample + one subsample per size): a subsample of an independent sample is one too."""
    import pandas as pd

    pop = C.make_population()
    out = []
    for d in range(DRAWS):
        hidden, y, letters = C.draw_sample(pop, reference, [SEPARATED], np.random.default_rng([11, d]))
        h5 = C.write_extraction(tmp_path / f"draw{d}.h5", hidden, y, letters, ["separated"])
        out.append(R.compute_resolution_study(h5, PARAMS, sizes, 1, seed=d).assign(draw=d))
    return pd.concat(out, ignore_index=True)


def test_the_rule_size_resolves_separated_classes_and_a_quarter_of_it_does_not(tmp_path):
    need = PARAMS.resolution_size()
    assert need == G.RESOLUTION_FACTOR * 16
    quarter = need // 4  # half the Gride scale's n2: the neighbourhoods reach into other classes
    study = _draws(tmp_path, [quarter, need], reference=6 * 16)
    limit = study.loc[study["whole"], "ari_subjects"].mean()  # the large-sample value (96 per class)
    assert limit > 0.95  # the classes are separated: there is something to resolve
    share = {n: R.within_tolerance("ari_subjects", g["ari_subjects"], limit).mean()
             for n, g in study[~study["whole"]].groupby("per_subject")}
    assert share[need] >= R.PROBABILITY  # at the rule's size: within 0.1 of the limit, 9 draws in 10 or more
    assert share[quarter] <= 0.5  # far below it the subjects merge, separated as they are
    small = study[~study["whole"] & (study["per_subject"] == quarter)]
    assert (small["ari_subjects"] < limit - 0.3).mean() >= 0.9
    assert (study.loc[study["per_subject"] == need, "resolution"] == G.RESOLVED).all()
    # the Gride ID at a fixed rank is not resolved by the rule: it still rises with the sample size (about
    # 0.73 of its value at 6 s on these classes), so IDs compare only at equal sizes
    at_need = study[~study["whole"] & (study["per_subject"] == need)]["id_gride"]
    id_limit = study.loc[study["whole"], "id_gride"].mean()
    assert R.within_tolerance("id_gride", at_need, id_limit).mean() <= 0.1 and at_need.median() < 0.85 * id_limit
    assert (small["resolution"] != G.RESOLVED).all()


def test_the_criterion_reads_the_ari_as_a_difference_and_the_id_as_a_ratio():
    assert R.within_tolerance("ari_subjects", [0.05, 0.25, np.nan], 0.1).tolist() == [True, False, False]
    assert R.within_tolerance("ari_subjects", [0.89, 0.91], 1.0).tolist() == [False, True]
    assert R.within_tolerance("id_gride", [4.4, 5.4, 6.0], 5.0).tolist() == [False, True, False]
    with pytest.raises(KeyError):
        R.within_tolerance("n_clusters", [1], 1)


def test_study_summary_reports_the_range_over_draws_and_the_share_within_tolerance(tmp_path):
    # separated classes: at the rule's size every draw is within tolerance of the whole sample, at a
    # quarter of it none; _min/_max are the smallest and largest per-draw group mean, nothing wider
    pop = C.make_population()
    hidden, y, letters = C.draw_sample(pop, 64, [SEPARATED], np.random.default_rng(5))
    h5 = C.write_extraction(tmp_path / "sample.h5", hidden, y, letters, ["separated"])
    study = R.compute_resolution_study(h5, replace(PARAMS, maxk=200), [8, 32], 4)
    summary = R.summarise_study(study).set_index(["per_subject", "whole"])
    for col in ("ari_subjects", "ari_subjects_min", "ari_subjects_max", "ari_subjects_within", "id_gride_within"):
        assert col in summary
    assert not any(c.endswith(("_lo", "_hi")) for c in summary.columns)
    per_draw = study[~study["whole"]].groupby(["per_subject", "draw"])["ari_subjects"].mean()
    assert summary.loc[(32, False), "ari_subjects_min"] == pytest.approx(per_draw.loc[32].min())
    assert summary.loc[(32, False), "ari_subjects_max"] == pytest.approx(per_draw.loc[32].max())
    assert summary.loc[(32, False), "ari_subjects_within"] == 1.0
    assert summary.loc[(8, False), "ari_subjects_within"] == 0.0
    assert np.isnan(summary.loc[(64, True), "ari_subjects_within"])
