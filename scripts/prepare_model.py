"""Rule prepare_model: resolve the configured model to a safetensors folder and write its card."""

from llmscape import models, rulekit

log = rulekit.start(snakemake, "prepare_model")
p = snakemake.params
info = models.prepare(p.model, snakemake.output.card, resources=p.resources_dir,
                      trust_remote_code=p.trust_remote_code, label=p.label)
log.info("model %s ready at %s (sha256 %s)", info["model"], info["path"], info["checksum"])
