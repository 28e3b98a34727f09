"""Rule extract: last-prompt-token states at every layer for one (model, variant, shots)."""
from pathlib import Path

from llmscape import data, models, rulekit  # noqa: E402
from llmscape.extract import ExtractConfig, extract  # noqa: E402

smk = snakemake  # noqa: F821
log = rulekit.start(smk, "extract")
cfg = ExtractConfig.from_dict(dict(smk.params.extract), shots=int(smk.wildcards.shots))
card = models.read_card(smk.input.card)
rows, pool = data.load_prepared(Path(smk.input.table).parent, split="analysis")
log.info("%d analysis questions, %d-shot, site %s, order %s, prefix sharing %s",
         len(rows), cfg.shots, cfg.site, cfg.shot_order, cfg.shares_prefix)
extract(card, rows, pool, cfg, smk.output.h5, smk.output.accuracy, seed=int(smk.params.seed), threads=smk.threads)
