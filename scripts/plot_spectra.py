"""Rule plot_spectra: metrics against depth, one panel per module type, every variant of the model."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")  # noqa: F821

import pandas as pd  # noqa: E402

from llmscape.io import read_parquet  # noqa: E402
from llmscape.spectra import plots  # noqa: E402

df = pd.concat([read_parquet(p) for p in snakemake.input.tables], ignore_index=True)  # noqa: F821
plots.plot_depth(df, snakemake.output.png, metrics=snakemake.params.metrics)  # noqa: F821
log.info("figure of %d matrices, %d variants -> %s", len(df), df["variant"].nunique(), snakemake.output.png)  # noqa: F821
