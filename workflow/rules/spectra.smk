# Weight spectra per matrix, spectrum-adaptive LoRA ranks and controlled stable-rank interventions.
#   any model card  -> results/spectra/{model}/{variant}.parquet          (rule spectra)
#   a fine-tuning run's final and checkpoint cards -> the same files, one job per run (rule spectra_run)
#   base spectra    -> results/spectra/{model}/adaptive_ranks.json        (rule adaptive_ranks, for finetune)
#   base card       -> results/variants/{model}/srank-{group}-{target}/hf + its model card (rule intervene)
#   all tables      -> results/spectra/{model}/depth.png                  (rule plot_spectra, in the report)


localrules:
    plot_spectra,


# A run's variants ({run}, {run}-step{N}) are made together by its finetune job; one job reads them all.
ruleorder: spectra_run > spectra


rule spectra:
    input:
        card="results/models/{model}/{variant}/model.json",
    output:
        table="results/spectra/{model}/{variant}.parquet",
    log:
        "logs/spectra/{model}/{variant}.log",
    benchmark:
        "benchmarks/spectra/{model}/{variant}.tsv"
    conda:
        "../../envs/spectra.yaml"
    threads: threads_of("spectra")
    resources:
        **res("spectra"),
    params:
        spectra=SPECTRA_JOB,
    script:
        "../../scripts/spectra.py"


rule spectra_run:
    """The spectra of a fine-tuning run's final weights and of all its checkpoints, in one job: each is
    minutes of work on a node, and one job per checkpoint would queue that many allocations."""
    input:
        cards=lambda wc: spectra_run_files(wc.model, wc.run, "results/models/{model}/{variant}/model.json"),
    output:
        tables=spectra_run_files("{model}", "{run}", "results/spectra/{model}/{variant}.parquet"),
    log:
        "logs/spectra/{model}/{run}.log",
    benchmark:
        "benchmarks/spectra/{model}/{run}.tsv"
    wildcard_constraints:
        run=FT_RUN_RE,
    conda:
        "../../envs/spectra.yaml"
    threads: threads_of("spectra")
    resources:
        **res("spectra_run", parent="spectra"),  # resources.spectra_run over resources.spectra: 1 + N variants
    params:
        spectra=SPECTRA_JOB,
    script:
        "../../scripts/spectra_run.py"


rule adaptive_ranks:
    input:
        table="results/spectra/{model}/base.parquet",
    output:
        json="results/spectra/{model}/adaptive_ranks.json",
    log:
        "logs/spectra/{model}/adaptive_ranks.log",
    conda:
        "../../envs/spectra.yaml"
    threads: threads_of("spectra")
    resources:
        **res("spectra"),
    params:
        adaptive=SPECTRA["adaptive"],
    script:
        "../../scripts/adaptive_ranks.py"


rule intervene:
    input:
        card="results/models/{model}/base/model.json",
    output:
        hf=directory("results/variants/{model}/srank-{group}-{target}/hf"),
        summary="results/variants/{model}/srank-{group}-{target}/intervention.json",
        card="results/models/{model}/srank-{group}-{target}/model.json",
    log:
        "logs/intervene/{model}/srank-{group}-{target}.log",
    benchmark:
        "benchmarks/intervene/{model}/srank-{group}-{target}.tsv"
    wildcard_constraints:
        group=r"[a-z]+",
        target=r"[0-9]+(\.[0-9]+)?",
    conda:
        "../../envs/spectra.yaml"
    threads: threads_of("spectra")
    resources:
        **res("spectra"),
    params:
        device=SPECTRA["device"],
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
    conda:
        "../../envs/spectra.yaml"
    params:
        metrics=SPECTRA["plot_metrics"],
    script:
        "../../scripts/plot_spectra.py"
