# Per-layer last-prompt-token representations, per (model, variant, shots), into HDF5: one job per
# (variant, shots), or with extract.one_job_per_variant one job per variant over its shot counts.


if not config["extract"]["one_job_per_variant"]:

    rule extract:
        input:
            **EXTRACT_INPUTS,
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
            **per_shot_job_resources(),
        params:
            extract=EXTRACT_PARAMS,
            seed=config["data"]["seed"],
        script:
            "../../scripts/extract.py"

else:

    # Snakemake outputs are fixed patterns, so a rule has one list of shot counts: the base model's
    # rule serves every variant when they share the shot counts, else extract_variants serves the others
    rule extract:
        input:
            **EXTRACT_INPUTS,
        output:
            h5=expand("results/reps/{{model}}/{{variant}}/{shots}shot.h5", shots=SHOTS),
            accuracy=expand("results/reps/{{model}}/{{variant}}/{shots}shot.json", shots=SHOTS),
        log:
            "logs/extract/{model}/{variant}/all_shots.log",
        benchmark:
            "benchmarks/extract/{model}/{variant}/all_shots.tsv"
        wildcard_constraints:
            variant=VARIANTS_AT_SHOTS,
        conda:
            "../../envs/extract.yaml"
        threads: threads_of("extract")
        resources:
            **res("extract"),  # the whole job: resources.extract.runtime covers every shot count
        params:
            extract=EXTRACT_PARAMS,
            seed=config["data"]["seed"],
            shots=SHOTS,
        script:
            "../../scripts/extract.py"

    if VARIANT_SHOTS != SHOTS:

        use rule extract as extract_variants with:
            output:
                h5=expand("results/reps/{{model}}/{{variant}}/{shots}shot.h5", shots=VARIANT_SHOTS),
                accuracy=expand("results/reps/{{model}}/{{variant}}/{shots}shot.json", shots=VARIANT_SHOTS),
            wildcard_constraints:
                variant=OTHER_VARIANTS,
            params:
                extract=EXTRACT_PARAMS,
                seed=config["data"]["seed"],
                shots=VARIANT_SHOTS,
