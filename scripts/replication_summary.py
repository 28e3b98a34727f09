"""Rule replication_summary: the findings of every replication set (value, interval, whether each holds),
the verdict of each finding over the sets, the per-layer paired differences per set, and the figure."""

from llmscape import rulekit

log = rulekit.start(snakemake, "replication_summary")

from llmscape.geometry import replicate
from llmscape.io import write_parquet
from llmscape.join.report import write_csv

smk = snakemake
variant = str(smk.params.variant)
runs = [(str(s), int(k)) for s, k in smk.params.runs]
sets = {(s, k): replicate.read_set(t, b, n, set_name=s, variant=variant, shots=k)
        for (s, k), t, b, n in zip(runs, smk.input.tables, smk.input.boots, smk.input.knns, strict=True)}
findings = replicate.summarise(replicate.compute_findings(sets, model=smk.wildcards.model, variant=variant))
write_parquet(smk.output.table, findings)
write_csv(findings, smk.output.summary)
write_parquet(smk.output.paired, replicate.paired_tables(sets))
replicate.plot_replication(sets, smk.output.figure, title=f"{smk.wildcards.model} / {variant}: replication sets")
verdicts = findings.drop_duplicates(["finding", "shots", "ref_shots"])
log.info("wrote %s: %d findings over %d sets: %s", smk.output.summary, len(verdicts), findings["set"].nunique(),
         verdicts["verdict"].value_counts().to_dict())
