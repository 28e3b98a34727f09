# Functions and settings of the extraction rules (workflow/rules/extract.smk).

EXTRACT_INPUTS = dict(
    card="results/models/{model}/{variant}/model.json",
    table="results/data/mmlu.parquet",
    pool="results/data/pool.parquet",
    index="results/data/analysis_index.npy",
)
# one job per variant: which variants the base model's rule serves (all of them when every variant is
# extracted at the same shot counts) and which the rule extract_variants serves
_ANY_VARIANT = r"[A-Za-z0-9][A-Za-z0-9._=-]*"
OTHER_VARIANTS = rf"(?!base(?:/|$)){_ANY_VARIANT}"
VARIANTS_AT_SHOTS = _ANY_VARIANT if SHOTS == VARIANT_SHOTS else "base"


def per_shot_job_resources():
    """A job of one shot count: resources.extract_<k>shot over resources.extract (a 0-shot job is a
    fraction of a 5-shot one)."""
    return {
        **res("extract"),
        "runtime": lambda wc, attempt: res(f"extract_{wc.shots}shot", parent="extract")["runtime"](wc, attempt),
        "mem_mb": lambda wc, attempt: res(f"extract_{wc.shots}shot", parent="extract")["mem_mb"](wc, attempt),
    }
