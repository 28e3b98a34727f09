"""Rule spectra_run: the spectra of a fine-tuning run's final weights and of all its checkpoints, in one
job (the cards and the tables come in the same order)."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")

from threadpoolctl import threadpool_limits  # installed with scikit-learn

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's

import torch

from llmscape.spectra.job import write_tables

torch.set_num_threads(max(1, int(snakemake.threads)))
write_tables(list(zip(snakemake.input.cards, snakemake.output.tables, strict=True)), snakemake.wildcards.model,
             snakemake.params.spectra, log)
