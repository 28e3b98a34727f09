"""Rule geometry_resolution: geometry of one extraction at several numbers of questions per subject."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry_resolution")

import torch

from llmscape import geometry
from llmscape.geometry import plots, resolution
from llmscape.io import atomic_path, write_parquet

smk = snakemake
wc = smk.wildcards
torch.set_num_threads(max(1, int(smk.threads)))
params = geometry.GeometryParams.from_config(dict(smk.params.geometry))
study = resolution.compute_resolution_study(smk.input.h5, params, smk.params.sizes, int(smk.params.draws),
                                            seed=params.seed, model=wc.model, variant=wc.variant,
                                            shots=int(wc.shots))
summary = resolution.summarise_study(study)
write_parquet(smk.output.table, study)
with atomic_path(smk.output.summary, suffix=".tmp.csv") as tmp:
    summary.to_csv(tmp, index=False, float_format="%.4g")
plots.plot_resolution(summary, smk.output.figure, resolution_size=params.resolution_size(),
                      n_subjects=len(geometry.read_labels(smk.input.h5)["subject_names"]),
                      title=f"{wc.model} / {wc.variant} / {wc.shots}-shot: geometry against questions per subject")
log.info("wrote %s:\n%s", smk.output.table, summary.round(3).to_string())
