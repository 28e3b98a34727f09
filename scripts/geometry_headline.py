"""Rule geometry_headline: the report's front-page figure (subject ARI per layer and shot count, with
its bands) for the base model that ran, as a PNG and as a self-contained HTML snippet."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry_headline")

import pandas as pd  # after the log is set up, so that an import error is logged

from llmscape.geometry import plots as geometry_plots
from llmscape.io import read_parquet

smk = snakemake
table = pd.concat([read_parquet(p) for p in smk.input.tables], ignore_index=True)
model = smk.params.model
geometry_plots.plot_headline(table, smk.output.png, model=model)
n_boot = int(table["n_boot"].max()) if "n_boot" in table else 0
conf = float(table["confidence"].dropna().iloc[0]) if "confidence" in table and n_boot else None
bands = f"; bands: {100 * conf:.0f}% intervals from {n_boot} subsamples of every subject" if conf else ""
caption = (f"{model}: adjusted Rand index between the density-peak clusters and the MMLU subjects, per layer, "
           f"one line per number of in-context examples ({int(table['n_questions'].max())} MMLU questions)"
           f"{bands}.")
geometry_plots.write_figure_html(smk.output.png, smk.output.html, caption)
log.info("wrote %s", list(smk.output))
