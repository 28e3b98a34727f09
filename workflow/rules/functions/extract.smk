# Functions and settings of the extraction rules (workflow/rules/extract.smk).

EXTRACT_INPUTS = dict(
    card="results/models/{model}/{variant}/model.json",
    table="results/data/mmlu.parquet",
    pool="results/data/pool.parquet",
    index="results/data/analysis_index.npy",
)
_OTHER_VARIANT = r"(?!base(?:/|$))[A-Za-z0-9][A-Za-z0-9._=-]*"  # any variant but the base model


def extract_job_kinds():
    """(rule name, variant pattern, shots) of the per-variant extraction rules: one rule when the base
    model and the other variants share their shot counts, else one rule each."""
    if SHOTS == VARIANT_SHOTS:
        return [("extract", r"[A-Za-z0-9][A-Za-z0-9._=-]*", SHOTS)]
    return [("extract", "base", SHOTS), ("extract_variants", _OTHER_VARIANT, VARIANT_SHOTS)]


def variant_job_resources():
    """A job over every shot count of a variant reads resources.extract (its runtime covers them all);
    resources.extract_<k>shot size the jobs of one shot count."""
    return res("extract")
