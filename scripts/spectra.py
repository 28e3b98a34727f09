"""Rule spectra: per-matrix weight-spectrum metrics of one model variant (any model card) to parquet."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")

from threadpoolctl import threadpool_limits  # installed with scikit-learn

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's

import torch

from llmscape.spectra.job import write_tables

torch.set_num_threads(max(1, int(snakemake.threads)))
write_tables([(snakemake.input.card, snakemake.output.table)], snakemake.wildcards.model,
             snakemake.params.spectra, log)
