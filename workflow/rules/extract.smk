# Per-layer last-prompt-token representations, per (model, variant, shots), into HDF5.


rule extract:
    input:
        card="results/models/{model}/{variant}/model.json",
        table="results/data/mmlu.parquet",
        pool="results/data/pool.parquet",
        index="results/data/analysis_index.npy",
    output:
        h5="results/reps/{model}/{variant}/{shots}shot.h5",
        accuracy="results/reps/{model}/{variant}/{shots}shot.json",
    log:
        "logs/extract/{model}/{variant}/{shots}shot.log",
    benchmark:
        "benchmarks/extract/{model}/{variant}/{shots}shot.tsv"
    conda:
        "../../envs/extract.yaml"
    threads: threads_of("extract")
    resources:
        # resources.extract_<k>shot over resources.extract: a 0-shot job is a fraction of a 5-shot one
        **{
            **res("extract"),
            "runtime": lambda wc, attempt: res(f"extract_{wc.shots}shot", parent="extract")["runtime"](wc, attempt),
            "mem_mb": lambda wc, attempt: res(f"extract_{wc.shots}shot", parent="extract")["mem_mb"](wc, attempt),
        },
    params:
        extract=EXTRACT_PARAMS,
        seed=config["data"]["seed"],
    script:
        "../../scripts/extract.py"
