"""Rule plot_join: the join stage's figures for the report."""

from llmscape import rulekit

log = rulekit.start(snakemake, "join")

from llmscape.io import read_csv, read_parquet
from llmscape.join import plots

smk = snakemake
hm = smk.params.heatmap
joined = read_parquet(smk.input.joined)
corr = read_parquet(smk.input.correlations)
plots.correlation_heatmap(corr, smk.output.heatmap, method=hm["method"], module=hm["module"], stat=hm["stat"])
plots.id_alpha_overlay(joined, smk.output.id_alpha)
plots.ari_panels(joined, smk.output.ari)
plots.accuracy_vs_trainable(read_csv(smk.input.variants), smk.output.accuracy_trainable)
plots.intervention_plot(read_parquet(smk.input.interventions), smk.output.interventions)
plots.trajectory_plot(read_parquet(smk.input.trajectories), smk.output.trajectories)
log.info("wrote %d figures", len(smk.output))
