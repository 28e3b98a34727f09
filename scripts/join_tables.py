"""Rule join_tables: geometry + spectra + accuracy + fine-tuning metrics -> the joined per-layer table."""

from llmscape import rulekit

log = rulekit.start(snakemake, "join")

import pandas as pd

from llmscape.io import read_json, read_parquet, write_parquet
from llmscape.join import tables
from llmscape.join.report import write_csv

smk = snakemake
variants, shots = list(smk.params.variants), [int(k) for k in smk.params.shots]
pairs = [(v, int(k)) for v, k in smk.params.pairs]  # the order of the geometry and accuracy inputs
geometry = pd.concat([read_parquet(p) for p in smk.input.geometry], ignore_index=True)
spectra = pd.concat([read_parquet(p) for p in smk.input.spectra], ignore_index=True)
accuracy = tables.read_accuracy(dict(zip(pairs, smk.input.accuracy, strict=True)))
finetune = {r: read_json(p) for r, p in zip(smk.params.runs, smk.input.finetune, strict=True)}
interventions = {v: read_json(p) for v, p in zip(smk.params.interventions, smk.input.interventions, strict=True)}
meta = tables.variant_table(variants, finetune, interventions)
joined = tables.join_model(geometry, spectra, meta, accuracy, variants=variants, shots=shots,
                           pairs=pairs, layer_match=smk.params.layer_match)
joined.insert(0, "model", joined.pop("model"))
write_parquet(smk.output.joined, joined)
summary = tables.variants_summary(joined)
write_csv(summary, smk.output.variants)
log.info("wrote %s: %d rows x %d columns", smk.output.joined, *joined.shape)
