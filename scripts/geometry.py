"""Rule geometry: ID, density peaks, ARIs and overlaps of every layer of one extraction, with intervals."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry")

import torch

from llmscape import geometry
from llmscape.io import write_parquet

smk = snakemake
torch.set_num_threads(max(1, int(smk.threads)))
params = geometry.GeometryParams.from_config(dict(smk.params.geometry))
log.info("parameters %s", params)
result = geometry.compute_geometry(smk.input.h5, params, model=smk.wildcards.model,
                                   variant=smk.wildcards.variant, shots=int(smk.wildcards.shots))
table = result.table
bad = table[table["status"] != geometry.STATUS_OK]
if len(bad):
    log.warning("layers without metrics: %s", dict(zip(bad["layer"], bad["status"], strict=True)))
geometry.write_knn(smk.output.knn, result.knn)
write_parquet(smk.output.gride, result.gride)
write_parquet(smk.output.boot, result.boot)
write_parquet(smk.output.table, table)
log.info("wrote %s (%d layers, %d subsamples)", smk.output.table, len(table), int(table["n_boot"].max()))
