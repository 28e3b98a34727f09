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
        **res("extract"),
    params:
        extract=EXTRACT_PARAMS,
        seed=config["data"]["seed"],
    script:
        "../../scripts/extract.py"
