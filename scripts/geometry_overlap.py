"""Rule geometry_overlap: neighbourhood overlap of an extraction with its 0-shot / base counterparts."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry_overlap")  # noqa: F821

from llmscape import geometry  # noqa: E402
from llmscape.io import write_parquet  # noqa: E402

smk = snakemake  # noqa: F821
wc = smk.wildcards
params = geometry.GeometryParams.from_config(dict(smk.params.geometry))
knn = geometry.read_knn(smk.input.knn)
refs = [(comparison, ref_variant, int(ref_shots), geometry.read_knn(path))
        for (comparison, ref_variant, ref_shots), path in zip(smk.params.refs, smk.input.refs)]
table = geometry.compute_pair_overlaps(knn, refs, model=wc.model, variant=wc.variant, shots=int(wc.shots),
                                       k=params.overlap_k, params=params)
write_parquet(smk.output.table, table)
log.info("wrote %s: %s", smk.output.table,
         table.groupby("comparison")["overlap"].describe().to_string())
