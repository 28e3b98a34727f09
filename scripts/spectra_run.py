"""Rule spectra_run: the spectra of a fine-tuning run's final weights and of all its checkpoints, in one
job (the cards and the tables come in the same order)."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")  # noqa: F821

from threadpoolctl import threadpool_limits  # noqa: E402  (installed with scikit-learn)

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's  # noqa: F821

import torch  # noqa: E402

from llmscape.spectra.job import write_tables  # noqa: E402

torch.set_num_threads(max(1, int(snakemake.threads)))  # noqa: F821
write_tables(list(zip(snakemake.input.cards, snakemake.output.tables)), snakemake.wildcards.model,  # noqa: F821
             snakemake.params.spectra, log)  # noqa: F821
