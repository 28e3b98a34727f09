"""Rule spectra: per-matrix weight-spectrum metrics of one model variant (any model card) to parquet."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")  # noqa: F821

from threadpoolctl import threadpool_limits  # noqa: E402  (installed with scikit-learn)

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's  # noqa: F821

import torch  # noqa: E402

from llmscape.spectra.job import write_tables  # noqa: E402

torch.set_num_threads(max(1, int(snakemake.threads)))  # noqa: F821
write_tables([(snakemake.input.card, snakemake.output.table)], snakemake.wildcards.model,  # noqa: F821
             snakemake.params.spectra, log)  # noqa: F821
