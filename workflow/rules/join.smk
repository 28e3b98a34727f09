# Join weight spectra with representation geometry: src/llmscape/join/.
#   geometry + spectra + accuracy + fine-tuning metrics -> results/join/{model}/joined.parquet  (join_tables)
#   joined + checkpoint spectra -> correlations, deltas, interventions, trajectories       (correlate)
#   tables -> figures in the report                                                        (plot_join)
#   the effective configuration -> results/join/{model}/config.html in the report          (join_config)
#
# Inputs come from the other stages' target functions when they are included in the Snakefile:
#   intervention_variants()  (spectra.smk)   srank-<group>-<target> variants
#   finetune_variants()      (finetune.smk)  one variant per fine-tuning run
#   checkpoint_variants()    (finetune.smk)  {run}-step{N}: merged checkpoints, for spectra during training
#   geometry_targets(), spectra_targets()    their presence switches join_targets() on
# A function that is absent contributes nothing (looked up with globals().get at DAG-build time, so the
# order of `include:` lines does not matter).
import re

JOIN = config["join"]


def _stage(name):
    fn = globals().get(name)
    return list(fn()) if callable(fn) else []


def join_enabled():
    """The join needs the geometry and spectra rules; without them it has no targets."""
    return callable(globals().get("geometry_targets")) and callable(globals().get("spectra_targets"))


def join_variants():
    """Variants in the joined table: join.variants, or base + interventions + fine-tuning runs."""
    if JOIN["variants"] is not None:
        return list(dict.fromkeys(JOIN["variants"]))
    return model_variants()


def join_runs():
    ft = set(_stage("finetune_variants"))
    return [v for v in join_variants() if v in ft]


def join_checkpoints():
    """(run, step, variant) of the merged checkpoints of the joined runs."""
    if not JOIN["checkpoints"]:
        return []
    runs, out = set(join_runs()), []
    for cv in _stage("checkpoint_variants"):
        m = re.fullmatch(r"(.+)-step(\d+)", cv)
        if m and m.group(1) in runs:
            out.append((m.group(1), int(m.group(2)), cv))
    return out


def join_interventions():
    iv = set(_stage("intervention_variants"))
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
    if not join_enabled():
        return []
    out = expand("results/join/{model}/{name}", model=MODEL,
                 name=["joined.parquet", "correlations.parquet", "config.html"])
    return out + expand("results/join/{model}/figures/{fig}.png", model=MODEL, fig=JOIN_FIGURES)


localrules:
    plot_join,
    join_config,
    join_all,


rule join_tables:
    input:
        unpack(join_table_inputs),
    output:
        joined="results/join/{model}/joined.parquet",
        variants=report(
            "results/join/{model}/variants.csv",
            caption="../report/join_variants.rst",
            category="Join",
            subcategory="Tables",
        ),
    log:
        "logs/join/{model}/join_tables.log",
    benchmark:
        "benchmarks/join/{model}/join_tables.tsv"
    params:
        variants=lambda wc: join_variants(),
        shots=SHOTS,
        pairs=lambda wc: variant_shot_pairs(join_variants()),
        runs=lambda wc: join_runs(),
        interventions=lambda wc: join_interventions(),
        layer_match=JOIN["layer_match"],
    resources:
        **res("join"),
    threads: threads_of("join")
    script:
        "../../scripts/join_tables.py"


rule correlate:
    input:
        unpack(join_correlate_inputs),
    output:
        correlations="results/join/{model}/correlations.parquet",
        top=report(
            "results/join/{model}/correlations_top.csv",
            caption="../report/join_top.rst",
            category="Join",
            subcategory="Tables",
        ),
        deltas="results/join/{model}/deltas.parquet",
        delta_correlations=report(
            "results/join/{model}/delta_correlations.csv",
            caption="../report/join_deltas.rst",
            category="Join",
            subcategory="Tables",
        ),
        interventions="results/join/{model}/interventions.parquet",
        intervention_effects=report(
            "results/join/{model}/intervention_effects.csv",
            caption="../report/join_intervention_effects.rst",
            category="Join",
            subcategory="Tables",
        ),
        trajectories="results/join/{model}/trajectories.parquet",
        trajectory_correlations=report(
            "results/join/{model}/trajectory_correlations.csv",
            caption="../report/join_trajectory_correlations.rst",
            category="Join",
            subcategory="Tables",
        ),
        summary="results/join/{model}/summary.json",
    log:
        "logs/join/{model}/correlate.log",
    benchmark:
        "benchmarks/join/{model}/correlate.tsv"
    params:
        join=JOIN,
        checkpoints=lambda wc: [[r, s] for r, s, _ in join_checkpoints()],
        runs=lambda wc: join_runs(),
    resources:
        **res("join"),
    threads: threads_of("join")
    script:
        "../../scripts/join_correlate.py"


rule plot_join:
    input:
        joined="results/join/{model}/joined.parquet",
        variants="results/join/{model}/variants.csv",
        correlations="results/join/{model}/correlations.parquet",
        interventions="results/join/{model}/interventions.parquet",
        trajectories="results/join/{model}/trajectories.parquet",
    output:
        heatmap=report(
            "results/join/{model}/figures/heatmap.png",
            caption="../report/join_heatmap.rst",
            category="Join",
            subcategory="Figures",
        ),
        id_alpha=report(
            "results/join/{model}/figures/id_alpha.png",
            caption="../report/join_id_alpha.rst",
            category="Join",
            subcategory="Figures",
        ),
        ari=report(
            "results/join/{model}/figures/ari.png",
            caption="../report/join_ari.rst",
            category="Join",
            subcategory="Figures",
        ),
        accuracy_trainable=report(
            "results/join/{model}/figures/accuracy_trainable.png",
            caption="../report/join_accuracy_trainable.rst",
            category="Join",
            subcategory="Figures",
        ),
        interventions=report(
            "results/join/{model}/figures/interventions.png",
            caption="../report/join_interventions.rst",
            category="Join",
            subcategory="Figures",
        ),
        trajectories=report(
            "results/join/{model}/figures/trajectories.png",
            caption="../report/join_trajectories.rst",
            category="Join",
            subcategory="Figures",
        ),
    log:
        "logs/join/{model}/plot_join.log",
    benchmark:
        "benchmarks/join/{model}/plot_join.tsv"
    params:
        heatmap=JOIN["heatmap"],
    script:
        "../../scripts/join_plots.py"


rule join_config:
    output:
        html=report(
            "results/join/{model}/config.html",
            caption="../report/join_config.rst",
            category="Configuration",
        ),
    log:
        "logs/join/{model}/join_config.log",
    params:
        config=config,  # a changed config re-runs this rule (params are a rerun trigger)
        configfiles=[str(f) for f in workflow.configfiles],
    script:
        "../../scripts/join_config.py"


rule join_all:
    """Only the join stage and its report entries: `snakemake join_all`."""
    input:
        lambda wc: join_targets(),
