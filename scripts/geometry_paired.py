"""Rule geometry_paired: paired differences of every geometry metric (same questions, same subsamples) for
every comparison of a model, the paired accuracy test, and their figures."""

from llmscape import rulekit

log = rulekit.start(snakemake, "geometry_paired")

from llmscape.geometry import paired
from llmscape.io import write_parquet
from llmscape.join import plots
from llmscape.join.report import write_csv

smk = snakemake
model = smk.wildcards.model
keys = [(v, int(k)) for v, k in smk.params.extractions]
comparisons = [(v, int(k), c, rv, int(rk)) for v, k, c, rv, rk in smk.params.comparisons]
extractions = {key: paired.read_extraction(t, b, n, variant=key[0], shots=key[1])
               for key, t, b, n in zip(keys, smk.input.tables, smk.input.boots, smk.input.knns, strict=True)}
diffs = paired.compute_all_differences(extractions, comparisons, model=model)
write_parquet(smk.output.table, diffs)
summary = paired.summarise_differences(diffs)
write_csv(summary, smk.output.summary)
accuracy = paired.compute_accuracy_pairs(dict(zip(keys, smk.input.h5, strict=True)), comparisons, model=model,
                                         confidence=float(smk.params.confidence), seed=int(smk.params.seed))
write_csv(accuracy, smk.output.accuracy)
for comparison in ("shots", "shots_step", "variant", "layer"):
    plots.difference_bands(diffs, smk.output[comparison], comparison=comparison, title=model)
log.info("wrote %s: %d differences (%s), %d accuracy comparisons", smk.output.table, len(diffs),
         diffs["verdict"].value_counts().to_dict(), len(accuracy))
