# Functions and settings of the join rules (workflow/rules/join.smk): targets, inputs, checks.
import re

JOIN = config["join"]
# what the correlate job reads of join: (variants, checkpoints, layer_match and heatmap choose inputs or
# belong to other rules)
JOIN_CORRELATE = {
    k: JOIN[k]
    for k in (
        "spectral_metrics",
        "modules",
        "stats",
        "geometry_metrics",
        "methods",
        "pooled",
        "n_boot",
        "ci",
        "seed",
        "top_k",
        "gap_window",
    )
}


def join_variants():
    """Variants in the joined table: join.variants, or base + interventions + fine-tuning runs."""
    if JOIN["variants"] is not None:
        return list(dict.fromkeys(JOIN["variants"]))
    return model_variants()


def join_runs():
    ft = set(finetune_variants())
    return [v for v in join_variants() if v in ft]


def join_checkpoints():
    """(run, step, variant) of the merged checkpoints of the joined runs."""
    if not JOIN["checkpoints"]:
        return []
    runs, out = set(join_runs()), []
    for cv in checkpoint_variants():
        m = re.fullmatch(r"(.+)-step(\d+)", cv)
        if m and m.group(1) in runs:
            out.append((m.group(1), int(m.group(2)), cv))
    return out


def join_interventions():
    iv = set(intervention_variants())
    return [v for v in join_variants() if v in iv]


def join_table_inputs(wildcards):
    m = wildcards.model
    variants = join_variants()
    return dict(
        geometry=[f"results/geometry/{m}/{v}/{k}shot.parquet" for v, k in variant_shot_pairs(variants)],
        spectra=[f"results/spectra/{m}/{v}.parquet" for v in variants],
        accuracy=[f"results/reps/{m}/{v}/{k}shot.json" for v, k in variant_shot_pairs(variants)],
        finetune=[f"results/finetune/{m}/{r}/metrics.json" for r in join_runs()],
        interventions=[f"results/variants/{m}/{v}/intervention.json" for v in join_interventions()],
    )


def join_correlate_inputs(wildcards):
    m = wildcards.model
    return dict(
        joined=f"results/join/{m}/joined.parquet",
        base_spectra=f"results/spectra/{m}/base.parquet",
        checkpoints=[f"results/spectra/{m}/{cv}.parquet" for _, _, cv in join_checkpoints()],
        finetune=[f"results/finetune/{m}/{r}/metrics.json" for r in join_runs()],
    )


JOIN_FIGURES = ("heatmap", "id_alpha", "ari", "accuracy_trainable", "interventions", "trajectories")


def join_targets():
    out = expand(
        "results/join/{model}/{name}", model=MODEL, name=["joined.parquet", "correlations.parquet", "config.html"]
    )
    return out + expand("results/join/{model}/figures/{fig}.png", model=MODEL, fig=JOIN_FIGURES)
