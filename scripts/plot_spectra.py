"""Rule plot_spectra: metrics against depth, one panel per module type, every variant of the model."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")

import pandas as pd

from llmscape.io import read_parquet
from llmscape.spectra import plots

df = pd.concat([read_parquet(p) for p in snakemake.input.tables], ignore_index=True)
plots.plot_depth(df, snakemake.output.png, metrics=snakemake.params.metrics)
log.info("figure of %d matrices, %d variants -> %s", len(df), df["variant"].nunique(), snakemake.output.png)
