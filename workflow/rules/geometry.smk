# Representation geometry per layer of every extraction (src/llmscape/geometry/), the neighbourhood
# overlaps between paired extractions (k-shot vs 0-shot, variant vs base), and the per-model figures.


localrules:
    plot_geometry,


def geometry_variants():
    return model_variants()


def geometry_references(model, variant, shots):
    """Paired extractions of the same questions: (comparison, ref_variant, ref_shots)."""
    refs = []
    if int(shots) != 0 and 0 in shots_of(variant):
        refs.append(("shots", variant, 0))
    if variant != "base" and int(shots) in shots_of("base"):
        refs.append(("variant", "base", int(shots)))
    return refs


def geometry_overlap_inputs(wildcards):
    return [
        f"results/geometry/{wildcards.model}/{v}/{k}shot_knn.npz"
        for _, v, k in geometry_references(wildcards.model, wildcards.variant, wildcards.shots)
    ]


def geometry_targets():
    out = []
    for variant in geometry_variants():
        for shots in shots_of(variant):
            out.append(f"results/geometry/{MODEL}/{variant}/{shots}shot.parquet")
            if geometry_references(MODEL, variant, shots):
                out.append(f"results/geometry/{MODEL}/{variant}/{shots}shot_overlap.parquet")
        out += expand(
            "results/figures/geometry/{model}/{variant}/{fig}.png",
            model=MODEL,
            variant=variant,
            fig=["ari", "id", "clusters"],
        )
    return out


rule geometry:
    input:
        h5="results/reps/{model}/{variant}/{shots}shot.h5",
    output:
        table="results/geometry/{model}/{variant}/{shots}shot.parquet",
        gride="results/geometry/{model}/{variant}/{shots}shot_gride.parquet",
        knn="results/geometry/{model}/{variant}/{shots}shot_knn.npz",
    log:
        "logs/geometry/{model}/{variant}/{shots}shot.log",
    benchmark:
        "benchmarks/geometry/{model}/{variant}/{shots}shot.tsv"
    params:
        geometry=config["geometry"],
    resources:
        **res("geometry"),
    threads: threads_of("geometry")
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
    params:
        refs=lambda wc: geometry_references(wc.model, wc.variant, wc.shots),
        k=config["geometry"]["overlap_k"],
    resources:
        **res("default"),
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
    script:
        "../../scripts/plot_geometry.py"
