"""Rule replication_subset: the questions of one replication set cut from an extraction into an extraction
file of its own (same datasets and attributes, its own checksums, marked complete), for its geometry."""

from llmscape import rulekit

log = rulekit.start(snakemake, "replication_subset")

from llmscape.geometry import replicate

smk = snakemake
wc = smk.wildcards
kept = replicate.write_subset(smk.input.h5, smk.output.h5, list(smk.params.subjects), set_name=wc.rset,
                              model=wc.model, variant=wc.variant, shots=int(wc.shots))
log.info("wrote %s: %d questions of %d subjects (%s)", smk.output.h5, kept, len(smk.params.subjects),
         ", ".join(smk.params.subjects))
