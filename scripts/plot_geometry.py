"""Rule plot_geometry: ARI, ID and cluster-count curves per layer, one line per number of shots."""

from llmscape import rulekit

log = rulekit.start(snakemake, "plot_geometry")

import pandas as pd

from llmscape.geometry import plots as geometry_plots
from llmscape.io import read_parquet

smk = snakemake
table = pd.concat([read_parquet(p) for p in smk.input.tables], ignore_index=True)
title = f"{smk.wildcards.model} / {smk.wildcards.variant}"
geometry_plots.plot_ari(table, smk.output.ari, title=title)
geometry_plots.plot_id(table, smk.output.id, title=title)
geometry_plots.plot_clusters(table, smk.output.clusters, title=title)
log.info("wrote %s", list(smk.output))
