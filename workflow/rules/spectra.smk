# Weight spectra per matrix, spectrum-adaptive LoRA ranks and controlled stable-rank interventions.
#   any model card  -> results/spectra/{model}/{variant}.parquet          (rule spectra)
#   base spectra    -> results/spectra/{model}/adaptive_ranks.json        (rule adaptive_ranks, for finetune)
#   base card       -> results/variants/{model}/srank-{group}-{target}/hf + its model card (rule intervene)
#   all tables      -> results/spectra/{model}/depth.png                  (rule plot_spectra, in the report)
from llmscape.spectra.intervene import variant_name as _srank_variant_name

SPECTRA = config["spectra"]


def intervention_variants():
    """Names of the stable-rank intervention variants the config asks for (srank-{group}-{target})."""
    iv = SPECTRA["intervene"]
    return [_srank_variant_name(g, t) for g in iv["groups"] for t in iv["targets"]]


def spectra_targets():
    variants = model_variants()
    return (
        expand("results/spectra/{model}/{variant}.parquet", model=MODEL, variant=variants)
        + expand("results/spectra/{model}/adaptive_ranks.json", model=MODEL)
        + expand("results/spectra/{model}/depth.png", model=MODEL)
    )


localrules:
    plot_spectra,


rule spectra:
    input:
        card="results/models/{model}/{variant}/model.json",
    output:
        table="results/spectra/{model}/{variant}.parquet",
    log:
        "logs/spectra/{model}/{variant}.log",
    benchmark:
        "benchmarks/spectra/{model}/{variant}.tsv"
    params:
        spectra=SPECTRA,
    resources:
        **res("spectra"),
    threads: threads_of("spectra")
    script:
        "../../scripts/spectra.py"


rule adaptive_ranks:
    input:
        table="results/spectra/{model}/base.parquet",
    output:
        json="results/spectra/{model}/adaptive_ranks.json",
    log:
        "logs/spectra/{model}/adaptive_ranks.log",
    params:
        adaptive=SPECTRA["adaptive"],
    resources:
        **res("spectra"),
    threads: threads_of("spectra")
    script:
        "../../scripts/adaptive_ranks.py"


rule intervene:
    input:
        card="results/models/{model}/base/model.json",
    output:
        hf=directory("results/variants/{model}/srank-{group}-{target}/hf"),
        summary="results/variants/{model}/srank-{group}-{target}/intervention.json",
        card="results/models/{model}/srank-{group}-{target}/model.json",
    wildcard_constraints:
        group=r"[a-z]+",
        target=r"[0-9]+(\.[0-9]+)?",
    log:
        "logs/intervene/{model}/srank-{group}-{target}.log",
    benchmark:
        "benchmarks/intervene/{model}/srank-{group}-{target}.tsv"
    params:
        device=SPECTRA["device"],
    resources:
        **res("spectra"),
    threads: threads_of("spectra")
    script:
        "../../scripts/intervene.py"


rule plot_spectra:
    input:
        tables=lambda wc: expand(
            "results/spectra/{model}/{variant}.parquet",
            model=wc.model,
            variant=["base"] + intervention_variants(),
        ),
    output:
        png=report(
            "results/spectra/{model}/depth.png",
            caption="../report/spectra_depth.rst",
            category="Weight spectra",
        ),
    log:
        "logs/spectra/{model}/plot.log",
    params:
        metrics=SPECTRA["plot_metrics"],
    script:
        "../../scripts/plot_spectra.py"
