"""The geometry metrics are declared once (llmscape.geometry.params.METRICS): the tests tie the written
layer table, the package docstring's column contract, the join's geometry columns and the config schema
to that declaration, so that none of them drifts from it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from llmscape import geometry as G
from llmscape.geometry.params import GRAPH, NEXT_LAYER, PAIR
from llmscape.io import write_parquet
from llmscape.join import columns as J, tables
from test_geometry import blobs, random_letters, write_h5

ROOT = Path(__file__).resolve().parents[1]
LAYER_METRICS = [m for m in G.METRICS if m.source in (GRAPH, NEXT_LAYER)]


def test_metric_names_are_unique_and_every_table_column_once():
    names = [m.name for m in G.METRICS]
    assert len(names) == len(set(names))
    assert len(G.TABLE_COLUMNS) == len(set(G.TABLE_COLUMNS)), "a metric's settings column is declared twice"
    assert len(G.BOOT_COLUMNS) == len(set(G.BOOT_COLUMNS))
    for m in LAYER_METRICS:  # each layer metric, with an interval exactly when declared so
        assert m.name in G.TABLE_COLUMNS
        assert (f"{m.name}_lo" in G.TABLE_COLUMNS) == (f"{m.name}_hi" in G.TABLE_COLUMNS) == m.interval
        assert (m.name in G.BOOT_COLUMNS) == m.interval
    assert "overlap" in G.OVERLAP_COLUMNS and "overlap" not in G.TABLE_COLUMNS  # the pair metric's own table


def test_interval_ranges_are_the_declared_ranges():
    """resample clips every interval to the range declared in METRICS (draws spread far past it)."""
    from llmscape.geometry.resample import return_metric_interval

    for m in G.METRICS:
        if not m.interval:
            continue
        theta = 0.5 if m.bounds[0] < 0.5 < m.bounds[1] else m.bounds[0] + 2
        lo, hi, _ = return_metric_interval(m.name, theta, [theta - 50, theta + 60, theta - 0.1, theta + 0.1], 0.8,
                                           0.95)
        assert m.bounds[0] <= lo <= theta <= hi <= m.bounds[1], m.name
        if m.transform == "none":  # on its own scale the spread reaches past a finite bound: clipped to it
            assert lo == m.bounds[0] if math.isfinite(m.bounds[0]) else lo < -10, m.name
            assert hi == m.bounds[1] if math.isfinite(m.bounds[1]) else hi > 10, m.name


def test_join_geometry_columns_follow_the_metric_table():
    """The join correlates every layer metric with an interval and carries their intervals: when a metric
    is added to or removed from METRICS, the join's columns follow (a hand copy would fail here)."""
    assert J.GEOMETRY_METRICS == tuple(m.name for m in LAYER_METRICS if m.interval)
    assert set(J.GEOMETRY_INFO) >= {f"{m.name}_{end}" for m in LAYER_METRICS if m.interval for end in ("lo", "hi")}
    assert set(J.GEOMETRY_METRICS) | set(J.GEOMETRY_INFO) <= set(G.TABLE_COLUMNS)


def test_schema_default_correlates_every_joined_metric():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    default = schema["properties"]["join"]["properties"]["geometry_metrics"]["default"]
    assert default == list(J.GEOMETRY_METRICS), "the schema's join.geometry_metrics default left the metric table"


def _docstring_layer_columns() -> set[str]:
    """The column names the package docstring lists for the layer table ({shots}shot.parquet)."""
    doc = G.__doc__
    section = doc[doc.index("``{shots}shot.parquet``: one row per"):doc.index("``{shots}shot_boot.parquet``")]
    names = set()
    for line in section.splitlines()[1:]:
        if not re.match(r"^ {4}\S", line):  # continuation lines are indented further
            continue
        left = re.split(r"\s{2,}", re.sub(r"\([^)]*\)", "", line.strip()))[0]
        names |= {t.strip() for t in left.split(",") if re.fullmatch(r"[a-z][a-z0-9_]*", t.strip())}
    return names


def test_package_docstring_lists_every_layer_column():
    """The docstring names each non-metric column of the layer table; the metrics (and their intervals)
    are described by the table generated from METRICS at its end."""
    metric_cols = {m.name for m in LAYER_METRICS} | {f"{m.name}_{e}" for m in LAYER_METRICS for e in ("lo", "hi")}
    assert _docstring_layer_columns() == set(G.TABLE_COLUMNS) - metric_cols
    generated = G.__doc__[G.__doc__.index("Metrics (params.METRICS)"):]
    assert all(f"``{m.name}``" in generated and m.description.split()[0] in generated for m in G.METRICS)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small extraction's layer table as the geometry job writes it, and read back."""
    tmp = tmp_path_factory.mktemp("table")
    X, y = blobs(n_per=40, n_blobs=3, dim=8, sep=20.0, seed=3)
    hidden = np.stack([X, X + np.random.default_rng(1).standard_normal(X.shape).astype(np.float32), X[::-1]])
    h5 = write_h5(tmp / "0shot.h5", hidden, np.array(["a", "b", "c"])[y], random_letters(len(y)))
    params = G.GeometryParams(maxk=40, id_range_max=16, id_scale=4, density_k=4, overlap_k=10, device="cpu",
                              n_boot=15, boot_fraction=0.8)
    result = G.compute_geometry(h5, params, model="toy", variant="base", shots=0)
    write_parquet(tmp / "0shot.parquet", result.table)
    write_parquet(tmp / "0shot_boot.parquet", result.boot)
    return pd.read_parquet(tmp / "0shot.parquet"), pd.read_parquet(tmp / "0shot_boot.parquet")


def test_written_table_columns_are_the_declared_contract(written):
    table, boot = written
    assert list(table.columns) == G.TABLE_COLUMNS
    assert list(boot.columns) == G.BOOT_COLUMNS
    assert (table["status"] == G.STATUS_OK).all()
    # the join reads it: its key and metric checks pass, and every column it carries is there
    assert tables.check_geometry(table, ["base"], [0]) == 3
    assert set(J.GEOMETRY_INFO) <= set(table.columns)


def test_written_values_lie_in_the_declared_ranges(written):
    table, boot = written
    for m in LAYER_METRICS:
        values = table[m.name].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        assert finite.size, m.name  # the last layer's overlap_next_layer is NaN, the others are not
        assert ((finite >= m.bounds[0]) & (finite <= m.bounds[1])).all(), m.name
        if m.integer:
            assert (finite == np.round(finite)).all(), m.name
        if not m.interval:
            continue
        lo, hi = table[f"{m.name}_lo"].to_numpy(dtype=float), table[f"{m.name}_hi"].to_numpy(dtype=float)
        ok = np.isfinite(values)
        assert np.isfinite(lo[ok]).all() and np.isfinite(hi[ok]).all(), m.name
        assert (lo[ok] >= m.bounds[0]).all() and (hi[ok] <= m.bounds[1]).all(), m.name
        assert (lo[ok] <= values[ok]).all() and (values[ok] <= hi[ok]).all(), m.name
        draws = boot[m.name].to_numpy(dtype=float)
        assert (draws[np.isfinite(draws)] >= m.bounds[0]).all() and (draws[np.isfinite(draws)] <= m.bounds[1]).all()


def test_pair_overlap_is_declared_for_the_pair_table():
    pair = [m for m in G.METRICS if m.source == PAIR]
    assert [m.name for m in pair] == ["overlap"]
    assert {f"{m.name}_{e}" for m in pair for e in ("lo", "hi")} <= set(G.OVERLAP_COLUMNS)


def test_docs_interval_table_matches_the_declaration():
    """docs/geometry.md's table of interval methods: each metric's scale and deflation as declared."""
    text = (ROOT / "docs/geometry.md").read_text()
    rows = re.findall(r"^\| (`[^|]+) \| ([^|]+) \| ([0-9.]+) \| [^|]+ \|$", text, flags=re.M)
    named = {}
    for names, scale, deflation in rows:
        for name in re.findall(r"`(\w+)`", names):
            named[name] = (scale.strip(), float(deflation))
    assert set(named) == {m.name for m in G.METRICS if m.interval}
    for m in G.METRICS:
        if m.interval:
            scale, deflation = named[m.name]
            assert deflation == m.deflation, m.name
            assert (scale == "logit") == (m.transform == "logit"), m.name
