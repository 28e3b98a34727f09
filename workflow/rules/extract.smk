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

else:
    # one rule for every variant when they share the shot counts, else one for the base model and one
    # for the others (Snakemake outputs are fixed patterns, so a rule has one list of shot counts)
    for _name, _variants, _shots in extract_job_kinds():

        rule:
            name:
                _name
            wildcard_constraints:
                variant=_variants,
            input:
                **EXTRACT_INPUTS,
            output:
                h5=expand("results/reps/{{model}}/{{variant}}/{shots}shot.h5", shots=_shots),
                accuracy=expand("results/reps/{{model}}/{{variant}}/{shots}shot.json", shots=_shots),
            log:
                "logs/extract/{model}/{variant}/all_shots.log",
            benchmark:
                "benchmarks/extract/{model}/{variant}/all_shots.tsv"
            conda:
                "../../envs/extract.yaml"
            threads: threads_of("extract")
            resources:
                **variant_job_resources(),
            params:
                extract=EXTRACT_PARAMS,
                seed=config["data"]["seed"],
                shots=_shots,
            script:
                "../../scripts/extract.py"
