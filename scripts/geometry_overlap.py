"""Rule geometry_overlap: neighbourhood overlap of an extraction with its 0-shot / base counterparts."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry_overlap")

from llmscape import geometry
from llmscape.io import write_parquet

smk = snakemake
wc = smk.wildcards
params = geometry.GeometryParams.from_config(dict(smk.params.geometry))
knn = geometry.read_knn(smk.input.knn)
refs = [(comparison, ref_variant, int(ref_shots), geometry.read_knn(path))
        for (comparison, ref_variant, ref_shots), path in zip(smk.params.refs, smk.input.refs, strict=True)]
table = geometry.compute_pair_overlaps(knn, refs, model=wc.model, variant=wc.variant, shots=int(wc.shots),
                                       k=params.overlap_k, params=params)
write_parquet(smk.output.table, table)
log.info("wrote %s: %s", smk.output.table,
         table.groupby("comparison")["overlap"].describe().to_string())
