# Join weight spectra with representation geometry: src/llmscape/join/.
#   geometry + spectra + accuracy + fine-tuning metrics -> results/join/{model}/joined.parquet  (join_tables)
#   joined + checkpoint spectra -> correlations, deltas, interventions, trajectories       (correlate)
#   tables -> figures in the report                                                        (plot_join)
#   the effective configuration -> results/join/{model}/config.html in the report          (join_config)
#
# Inputs come from the other stages' functions (workflow/rules/functions/, all included by common.smk
# before any rule file, so a misspelt name fails when the DAG is built):
#   intervention_variants()  (spectra)   srank-<group>-<target> variants
#   finetune_variants()      (finetune)  one variant per fine-tuning run
#   checkpoint_variants()    (finetune)  {run}-step{N}: merged checkpoints, for spectra during training


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
    conda:
        "../../envs/join.yaml"
    threads: threads_of("join")
    resources:
        **res("join"),
    params:
        variants=lambda wc: join_variants(),
        shots=SHOTS,
        pairs=lambda wc: variant_shot_pairs(join_variants()),
        runs=lambda wc: join_runs(),
        interventions=lambda wc: join_interventions(),
        layer_match=JOIN["layer_match"],
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
    conda:
        "../../envs/join.yaml"
    threads: threads_of("join")
    resources:
        **res("join"),
    params:
        join=JOIN_CORRELATE,
        checkpoints=lambda wc: [[r, s] for r, s, _ in join_checkpoints()],
        runs=lambda wc: join_runs(),
    script:
        "../../scripts/correlate.py"


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
    conda:
        "../../envs/join.yaml"
    params:
        heatmap=JOIN["heatmap"],
    script:
        "../../scripts/plot_join.py"


rule join_config:
    output:
        html=report(
            "results/join/{model}/config.html",
            caption="../report/join_config.rst",
            category="Configuration",
        ),
    log:
        "logs/join/{model}/join_config.log",
    conda:
        "../../envs/join.yaml"
    params:
        config=config,  # a changed config re-runs this rule (params are a rerun trigger)
        configfiles=[str(f) for f in workflow.configfiles],
    script:
        "../../scripts/join_config.py"


rule join_all:
    """Only the join stage and its report entries: `snakemake join_all`."""
    input:
        lambda wc: join_targets(),
