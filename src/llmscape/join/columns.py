"""Column names the join stage reads from the other stages, in one place.

The geometry, spectra, fine-tuning and extraction stages document their outputs as contracts (see the
docstrings of ``llmscape.geometry``, ``llmscape.spectra``, ``llmscape.finetune.train`` and
``llmscape.extract``). When one of them renames a column, change it here only.
"""

from __future__ import annotations

from ..errors import LlmscapeError
from ..geometry.params import INTERVAL_METRICS
from ..projections import DECODER_MODULES, MODULE_GROUPS, PROJECTION_GROUPS  # noqa: F401 (re-exported)


class JoinError(LlmscapeError, ValueError):
    """Inputs that cannot be joined without losing rows: the message names what is missing."""


# --- geometry: results/geometry/{model}/{variant}/{shots}shot.parquet, one row per layer ---------------
GEOMETRY_KEY = ("model", "variant", "shots", "layer")
#: the metrics correlated with spectra: every metric of the layer table with an interval, as declared in
#: llmscape.geometry.params.METRICS (a metric added there is joined without an edit here)
GEOMETRY_METRICS = INTERVAL_METRICS
#: carried along, not correlated: identity, resolution, and each metric's interval where the table has one
GEOMETRY_INFO = ("layer_name", "status", "n_points", "subject_size_min", "resolution",
                 *(f"{m}_{end}" for m in GEOMETRY_METRICS for end in ("lo", "hi")))

# --- spectra: results/spectra/{model}/{variant}.parquet, one row per weight matrix ---------------------
SPECTRA_KEY = ("model", "variant", "layer", "module")
SPECTRA_NON_METRIC = ("name", "shape_out", "shape_in", "seconds")  # everything else numeric is a metric
#: the decoder's module types (DECODER_MODULES), the groups aggregated besides them (MODULE_GROUPS: attn,
#: mlp, all) and the stable-rank intervention's groups (SRANK_GROUPS, ``srank-{group}-{target}``) are
#: llmscape.projections'
SRANK_GROUPS = PROJECTION_GROUPS
STATS = ("mean", "median")


def spec_col(metric: str, module: str, stat: str = "mean") -> str:
    """Name of an aggregated spectral column in the joined table, e.g. ``stable_rank|mlp|mean``."""
    return f"{metric}|{module}|{stat}"


def parse_spec_col(col: str) -> tuple[str, str, str] | None:
    parts = col.split("|")
    return tuple(parts) if len(parts) == 3 else None


# --- fine-tuning: results/finetune/{model}/{run}/metrics.json ------------------------------------------
FT_SPEC_FIELDS = ("lr", "rank", "value_lr_ratio", "seed")  # metrics["spec"][...] hyper-parameters
FT_SCALARS = {  # joined column -> metrics.json key
    "trainable_params": "trainable_params",
    "total_params": "total_params",
    "trainable_share": "trainable_share",
    "ft_steps": "steps",
    "ft_train_time_s": "train_time_s",
    "ft_wall_time_s": "wall_time_s",
}
FT_ACCURACY = ("accuracy", "accuracy")  # metrics["accuracy"]["accuracy"]: in-job evaluation accuracy
FT_TRAIN_LOSS, FT_VAL_LOSS = "train_loss", "val_loss"  # lists of {step, loss}
CHECKPOINT_VARIANT = "{run}-step{step}"  # variant name of a merged checkpoint

# --- extraction accuracy: results/reps/{model}/{variant}/{shots}shot.json ------------------------------
ACCURACY_FIELDS = ("accuracy", "accuracy_nospace")

# --- variant methods ---------------------------------------------------------------------------------
BASE_METHOD = "base"
SRANK_METHOD = "srank-intervention"
