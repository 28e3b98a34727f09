"""One source for every default: where the library keeps a default of its own (for use outside the
workflow), it must be the schema's. The workflow fills every default from the schema at DAG build."""
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from llmscape.data import DATA_DEFAULTS
from llmscape.extract import ExtractConfig, count_config_tokens
from llmscape.finetune.train import EVAL_DEFAULTS, TRAIN_DEFAULTS
from llmscape.geometry import GeometryParams
from llmscape.projections import DECODER_MODULES, MODULE_GROUPS, PROJECTION_GROUPS

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
    ("data", DATA_DEFAULTS),
])
def test_library_defaults_are_the_schema_defaults(defaults, section, library):
    schema = defaults
    for part in section.split("."):
        schema = schema[part]
    assert set(library) <= set(schema), f"library keys the schema lacks: {set(library) - set(schema)}"
    assert library == {k: schema[k] for k in library}


def test_the_extraction_helpers_default_to_the_schema(defaults):
    """The token-counting helpers' defaults (used by the plan's estimates) are the schema's."""
    keys = ("shot_order", "shot_seed", "prefix_sharing", "token_budget", "max_batch")
    params = inspect.signature(count_config_tokens).parameters
    assert {k: params[k].default for k in keys} == {k: defaults["extract"][k] for k in keys}


def test_the_schema_names_the_projections_of_llmscape_projections():
    """The schema's lists of decoder projections (spectra.modules, the intervention groups, join.modules)
    are the ones the code declares once, in llmscape.projections."""
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]
    spectra = schema["spectra"]["properties"]
    assert spectra["modules"]["items"]["enum"] == list(DECODER_MODULES)
    assert spectra["modules"]["default"] == list(DECODER_MODULES)
    assert spectra["intervene"]["properties"]["groups"]["items"]["enum"] == list(PROJECTION_GROUPS)
    assert schema["join"]["properties"]["modules"]["items"]["enum"] == [*DECODER_MODULES, *MODULE_GROUPS]
