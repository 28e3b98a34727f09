"""Rule extract: last-prompt-token states at every layer for one (model, variant, shots)."""
from llmscape import data, models, rulekit
from llmscape.extract import ExtractConfig, extract

smk = snakemake  # noqa: F821
log = rulekit.start(smk, "extract")
cfg = ExtractConfig.from_dict(dict(smk.params.extract), shots=int(smk.wildcards.shots))
card = models.read_card(smk.input.card)
cfg.max_memory = models.fit_on_gpus(card["path"], cfg)  # fails here, before any weight is loaded
rows, pool = data.read_prepared(smk.input.table, smk.input.pool, smk.input.index)
log.info("%d analysis questions, %d-shot, site %s, order %s, prefix sharing %s",
         len(rows), cfg.shots, cfg.site, cfg.shot_order, cfg.shares_prefix)
extract(card, rows, pool, cfg, smk.output.h5, smk.output.accuracy, seed=int(smk.params.seed), threads=smk.threads)
