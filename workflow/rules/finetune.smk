# Fine-tuning sweeps: finetune.sweeps expands into one `finetune` job per run; each finished
# run is a model variant (its weights, an adapter or a merged folder, + card) for extraction, geometry and
# spectra, and its log-spaced checkpoints are variants too (`{run}-step{N}`), for spectra during training.
# Grid problems (unknown method, out-of-range value, rank above a matrix, missing adaptive-rank file)
# stop the workflow here, at DAG-build time, before any job is submitted.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        metrics="results/finetune/{model}/{run}/metrics.json",
        weights=directory("results/finetune/{model}/{run}/weights"),
        checkpoints=directory("results/finetune/{model}/{run}/checkpoints"),
        card="results/models/{model}/{run}/model.json",
        checkpoint_cards=expand("results/models/{{model}}/{{run}}-step{step}/model.json", step=FT_CKPT_STEPS),
    log:
        "logs/finetune/{model}/{run}.log",
    benchmark:
        "benchmarks/finetune/{model}/{run}.tsv"
    wildcard_constraints:
        run=FT_RUN_RE,
    conda:
        "../../envs/finetune.yaml"
    threads: lambda wc: int(res(_ft_method_group(wc.run), parent="finetune").get("cpus_per_task", 1))
    resources:
        **finetune_resources(),
    params:
        run=lambda wc: asdict(FT_RUNS[wc.run]),  # plain data: the job unpickles params before its imports
        train=FT_TRAIN,
        eval=FT["eval"],
        steps=FT_CKPT_STEPS,
        launch=FT_LAUNCH,
        trust_remote_code=config["trust_remote_code"],
    script:
        "../../scripts/finetune.py"


rule finetune_all:
    """Only the sweep (training, run variants, checkpoint cards): `snakemake finetune_all`."""
    input:
        lambda wc: [t for t in finetune_targets() if not t.startswith("results/reps/")],
