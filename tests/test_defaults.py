"""One source for every default: where the library keeps a default of its own (for use outside the
workflow), it must be the schema's. The workflow fills every default from the schema at DAG build."""
import dataclasses
from pathlib import Path

import pytest
from snakemake.utils import validate

from llmscape.extract import ExtractConfig
from llmscape.finetune.train import EVAL_DEFAULTS, TRAIN_DEFAULTS
from llmscape.geometry import GeometryParams

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def defaults():
    config = {}
    validate(config, str(SCHEMA), set_default=True)
    return config


def _dataclass_defaults(cls):
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("section, library", [
    ("geometry", _dataclass_defaults(GeometryParams)),
    ("extract", {k: v for k, v in _dataclass_defaults(ExtractConfig).items() if k != "shots"}),
    ("finetune.train", TRAIN_DEFAULTS),
    ("finetune.eval", EVAL_DEFAULTS),
])
def test_library_defaults_are_the_schema_defaults(defaults, section, library):
    schema = defaults
    for part in section.split("."):
        schema = schema[part]
    assert set(library) <= set(schema), f"library keys the schema lacks: {set(library) - set(schema)}"
    assert library == {k: schema[k] for k in library}
