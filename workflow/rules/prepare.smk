# Inputs of everything else: the model (as a card pointing at a safetensors folder) and MMLU splits.


rule prepare_model:
    output:
        card="results/models/{model}/base/model.json",
    log:
        "logs/prepare_model/{model}.log",
    conda:
        "../../envs/prepare.yaml"
    threads: threads_of("prepare")
    resources:
        **res("prepare"),
    params:
        model=config["model"],
        label=config.get("model_label"),
        trust_remote_code=config["trust_remote_code"],
        resources_dir=RES_DIR,
    script:
        "../../scripts/prepare_model.py"


rule prepare_data:
    output:
        table="results/data/mmlu.parquet",
        pool="results/data/pool.parquet",
        analysis="results/data/analysis_index.npy",
        finetune="results/data/finetune_index.npy",
        summary="results/data/summary.json",
    log:
        "logs/prepare_data.log",
    conda:
        "../../envs/prepare.yaml"
    resources:
        **res("prepare"),
    params:
        data=config["data"],
        resources_dir=RES_DIR,
    script:
        "../../scripts/prepare_data.py"
