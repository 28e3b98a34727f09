# Representation geometry per layer of every extraction (src/llmscape/geometry/), with intervals from
# subsamples of every subject; the neighbourhood overlaps between paired extractions (k-shot vs 0-shot,
# variant vs base); the resolution study of one extraction; the per-model figures.


localrules:
    plot_geometry,
    geometry_headline,


rule geometry:
    input:
        h5="results/reps/{model}/{variant}/{shots}shot.h5",
    output:
        table="results/geometry/{model}/{variant}/{shots}shot.parquet",
        gride="results/geometry/{model}/{variant}/{shots}shot_gride.parquet",
        knn="results/geometry/{model}/{variant}/{shots}shot_knn.npz",
        boot="results/geometry/{model}/{variant}/{shots}shot_boot.parquet",
    log:
        "logs/geometry/{model}/{variant}/{shots}shot.log",
    benchmark:
        "benchmarks/geometry/{model}/{variant}/{shots}shot.tsv"
    conda:
        "../../envs/geometry.yaml"
    threads: threads_of("geometry")
    resources:
        **res("geometry"),
    params:
        geometry=GEOMETRY_PARAMS,
    script:
        "../../scripts/geometry.py"


rule geometry_overlap:
    input:
        knn="results/geometry/{model}/{variant}/{shots}shot_knn.npz",
        refs=geometry_overlap_inputs,
    output:
        table="results/geometry/{model}/{variant}/{shots}shot_overlap.parquet",
    log:
        "logs/geometry_overlap/{model}/{variant}/{shots}shot.log",
    conda:
        "../../envs/geometry.yaml"
    resources:
        **res("default"),
    params:
        refs=lambda wc: geometry_references(wc.model, wc.variant, wc.shots),
        geometry=GEOMETRY_PARAMS,
    script:
        "../../scripts/geometry_overlap.py"


rule plot_geometry:
    input:
        tables=lambda wc: [f"results/geometry/{wc.model}/{wc.variant}/{k}shot.parquet" for k in shots_of(wc.variant)],
    output:
        ari=report(
            "results/figures/geometry/{model}/{variant}/ari.png",
            caption="../report/geometry_ari.rst",
            category="Geometry",
            subcategory="{model} {variant}",
        ),
        id=report(
            "results/figures/geometry/{model}/{variant}/id.png",
            caption="../report/geometry_id.rst",
            category="Geometry",
            subcategory="{model} {variant}",
        ),
        clusters=report(
            "results/figures/geometry/{model}/{variant}/clusters.png",
            caption="../report/geometry_clusters.rst",
            category="Geometry",
            subcategory="{model} {variant}",
        ),
    log:
        "logs/plot_geometry/{model}/{variant}.log",
    conda:
        "../../envs/geometry.yaml"
    script:
        "../../scripts/plot_geometry.py"


rule geometry_headline:
    input:
        tables=lambda wc: [f"results/geometry/{wc.model}/base/{k}shot.parquet" for k in shots_of("base")],
    output:
        png="results/figures/geometry/{model}/headline.png",
        html=report(
            "results/figures/geometry/{model}/headline.html",
            caption="../report/geometry_headline.rst",
            category="Geometry",
            subcategory="{model} headline",
        ),
    log:
        "logs/geometry_headline/{model}.log",
    conda:
        "../../envs/geometry.yaml"
    params:
        model=lambda wc: wc.model,
    script:
        "../../scripts/geometry_headline.py"


rule geometry_resolution:
    input:
        h5="results/reps/{model}/{variant}/{shots}shot.h5",
    output:
        table="results/geometry/{model}/resolution/{variant}_{shots}shot.parquet",
        summary=report(
            "results/geometry/{model}/resolution/{variant}_{shots}shot_summary.csv",
            caption="../report/geometry_resolution_table.rst",
            category="Geometry",
            subcategory="Resolution",
        ),
        figure=report(
            "results/figures/geometry/{model}/resolution_{variant}_{shots}shot.png",
            caption="../report/geometry_resolution.rst",
            category="Geometry",
            subcategory="Resolution",
        ),
    log:
        "logs/geometry_resolution/{model}/{variant}_{shots}shot.log",
    benchmark:
        "benchmarks/geometry_resolution/{model}/{variant}_{shots}shot.tsv"
    conda:
        "../../envs/geometry.yaml"
    threads: threads_of("geometry")
    resources:
        **res("geometry"),
    params:
        geometry=GEOMETRY_PARAMS,
        sizes=STUDY["sizes"],
        draws=STUDY["draws"],
    script:
        "../../scripts/geometry_resolution.py"


# Paired differences per model: every geometry metric of each comparison (k-shot vs 0-shot and vs the next
# smaller shot count, variant vs base, layer l + 1 vs l), computed draw by draw on the same subsamples, and the accuracy of the same
# comparisons on the same questions (exact McNemar, paired bootstrap). Small tables: runs on the head node.
localrules:
    geometry_paired,


rule geometry_paired:
    input:
        unpack(geometry_paired_inputs),
    output:
        table="results/geometry/{model}/paired_differences.parquet",
        summary=report(
            "results/geometry/{model}/paired_summary.csv",
            caption="../report/geometry_paired_summary.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
        accuracy=report(
            "results/geometry/{model}/paired_accuracy.csv",
            caption="../report/geometry_paired_accuracy.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
        shots=report(
            "results/figures/geometry/{model}/paired_shots.png",
            caption="../report/geometry_paired_bands.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
        shots_step=report(
            "results/figures/geometry/{model}/paired_shots_step.png",
            caption="../report/geometry_paired_bands.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
        variant=report(
            "results/figures/geometry/{model}/paired_variant.png",
            caption="../report/geometry_paired_bands.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
        layer=report(
            "results/figures/geometry/{model}/paired_layer.png",
            caption="../report/geometry_paired_bands.rst",
            category="Geometry",
            subcategory="Paired differences",
        ),
    log:
        "logs/geometry_paired/{model}.log",
    conda:
        "../../envs/geometry.yaml"
    params:
        extractions=lambda wc: [[v, k] for v, k in paired_extractions()],
        comparisons=lambda wc: [list(c) for c in paired_comparisons()],
        confidence=GEOMETRY_PARAMS.get("confidence", 0.95),
        seed=GEOMETRY_PARAMS.get("seed", 0),
    script:
        "../../scripts/geometry_paired.py"


# Replication (geometry.replication): each subject set's questions cut from an extraction into a file of its own
# (temporary; checksummed and complete like an extraction), its geometry computed by the geometry rule with the
# same intervals, and per model which findings hold in every set (docs/geometry.md, "Replication").
# Defined only when sets are given, so that every rule listed is in the DAG (as extract_variants).
if replication_sets():

    localrules:
        replication_summary,

    rule replication_subset:
        input:
            h5="results/reps/{model}/{variant}/{shots}shot.h5",
        output:
            h5=temp("results/reps/{model}/replication/{rset}/{variant}/{shots}shot.h5"),
        log:
            "logs/replication_subset/{model}/{rset}/{variant}/{shots}shot.log",
        benchmark:
            "benchmarks/replication_subset/{model}/{rset}/{variant}/{shots}shot.tsv"
        wildcard_constraints:
            rset=REPLICATION_SET_NAME,
        conda:
            "../../envs/geometry.yaml"
        resources:
            **res("default"),
        params:
            subjects=lambda wc: list(REPLICATION["sets"][wc.rset]),
        script:
            "../../scripts/replication_subset.py"

    use rule geometry as replication_geometry with:
        input:
            h5="results/reps/{model}/replication/{rset}/{variant}/{shots}shot.h5",
        output:
            table="results/geometry/{model}/replication/{rset}/{variant}/{shots}shot.parquet",
            gride="results/geometry/{model}/replication/{rset}/{variant}/{shots}shot_gride.parquet",
            knn="results/geometry/{model}/replication/{rset}/{variant}/{shots}shot_knn.npz",
            boot="results/geometry/{model}/replication/{rset}/{variant}/{shots}shot_boot.parquet",
        log:
            "logs/replication_geometry/{model}/{rset}/{variant}/{shots}shot.log",
        benchmark:
            "benchmarks/replication_geometry/{model}/{rset}/{variant}/{shots}shot.tsv"
        wildcard_constraints:
            rset=REPLICATION_SET_NAME,

    rule replication_summary:
        input:
            unpack(replication_summary_inputs),
        output:
            table="results/geometry/{model}/replication/replication.parquet",
            summary=report(
                "results/geometry/{model}/replication/replication.csv",
                caption="../report/replication_table.rst",
                category="Geometry",
                subcategory="Replication",
            ),
            paired="results/geometry/{model}/replication/paired_differences.parquet",
            figure=report(
                "results/figures/geometry/{model}/replication_ari.png",
                caption="../report/replication_ari.rst",
                category="Geometry",
                subcategory="Replication",
            ),
        log:
            "logs/replication_summary/{model}.log",
        benchmark:
            "benchmarks/replication_summary/{model}.tsv"
        conda:
            "../../envs/geometry.yaml"
        params:
            runs=lambda wc: [[s, k] for s, k in replication_runs()],
            variant=REPLICATION["variant"],
        script:
            "../../scripts/replication_summary.py"
