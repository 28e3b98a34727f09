"""Rule extract: last-prompt-token states at every layer for one (model, variant, shots)."""
from llmscape import data, models, rulekit
from llmscape.extract import ExtractConfig, extract

smk = snakemake  # noqa: F821
log = rulekit.start(smk, "extract")
cfg = ExtractConfig.from_dict(dict(smk.params.extract), shots=int(smk.wildcards.shots))
card = models.read_card(smk.input.card)
# the GPUs are checked before any weight is read; sharded, the model is loaded on the device map planned
# for them (room left for keys/values and activations on every GPU), else extract() loads it as usual
placed = models.fit_on_gpus(card, cfg)
tok = model = None
if placed is not None:
    tok, model = models.load(card["path"], dtype=cfg.dtype, device=models.pick_device(cfg.device),
                             trust_remote_code=card.get("trust_remote_code", False), device_map=placed,
                             offload_folder=cfg.offload_folder, adapter=card.get("adapter"))
rows, pool = data.read_prepared(smk.input.table, smk.input.pool, smk.input.index)
log.info("%d analysis questions, %d-shot, site %s, order %s, prefix sharing %s",
         len(rows), cfg.shots, cfg.site, cfg.shot_order, cfg.shares_prefix)
extract(card, rows, pool, cfg, smk.output.h5, smk.output.accuracy, seed=int(smk.params.seed), threads=smk.threads,
        model=model, tok=tok)
