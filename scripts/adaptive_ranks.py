"""Rule adaptive_ranks: spectrum-adaptive LoRA rank / alpha patterns (peft-ready JSON) from a spectra table."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")

from llmscape.io import read_parquet, write_json
from llmscape.spectra import adaptive

cfg = dict(snakemake.params.adaptive)
r, lora_alpha = cfg.pop("r"), cfg.pop("lora_alpha")
spectra = read_parquet(snakemake.input.table)
ranks = adaptive.compute_adaptive_ranks(spectra, **cfg)
out = adaptive.return_peft_config(ranks, r=r, lora_alpha=lora_alpha, settings=cfg,
                                  model=snakemake.wildcards.model, variant="base")
write_json(snakemake.output.json, out)
shapes = {n[: -len(".weight")]: (int(o), int(i))
          for n, o, i in spectra[["name", "shape_out", "shape_in"]].itertuples(index=False)}
log.info("adaptive ranks (%s, %s, %s): %d of %d matrices selected, ranks %d..%d, %d LoRA parameters",
         cfg["select"], cfg["direction"], cfg["scaling"], out["n_selected"], out["n_analysed"],
         min(out["rank_pattern"].values()), max(out["rank_pattern"].values()),
         adaptive.compute_rank_budget(out, shapes))
