# Functions and settings of the spectra rules (workflow/rules/spectra.smk): targets, inputs, checks.
from llmscape.spectra.intervene import variant_name as _srank_variant_name

SPECTRA = config["spectra"]
# what a spectra job reads (the adaptive ranks, interventions and plots have their own rules and keys)
SPECTRA_JOB = {k: v for k, v in SPECTRA.items() if k not in ("adaptive", "intervene", "plot_metrics")}


def intervention_variants():
    """Names of the stable-rank intervention variants the config asks for (srank-{group}-{target})."""
    iv = SPECTRA["intervene"]
    return [_srank_variant_name(g, t) for g in iv["groups"] for t in iv["targets"]]


def spectra_run_files(model, run, pattern):
    """``pattern`` for a fine-tuning run's variants: its final weights, then its checkpoints in step order
    (the variants the rule spectra_run computes in one job)."""
    variants = [run] + [f"{run}-step{s}" for s in FT_CKPT_STEPS]
    return [pattern.replace("{model}", model).replace("{variant}", v) for v in variants]


def spectra_targets():
    variants = model_variants()
    return (
        expand("results/spectra/{model}/{variant}.parquet", model=MODEL, variant=variants)
        + expand("results/spectra/{model}/adaptive_ranks.json", model=MODEL)
        + expand("results/spectra/{model}/depth.png", model=MODEL)
    )
