"""Rule extract: last-prompt-token states at every layer for one (model, variant) at one shot count, or
at every shot count of the variant in one job (extract.one_job_per_variant), the weights read once."""
from llmscape import data, extract_job, models, rulekit

smk = snakemake
log = rulekit.start(smk, "extract")
shots = [int(smk.wildcards.shots)] if "shots" in smk.wildcards.keys() else [int(k) for k in smk.params.shots]
h5s, accuracies = ([f] if isinstance(f, str) else list(f) for f in (smk.output.h5, smk.output.accuracy))
card = models.read_card(smk.input.card)
rows, pool = data.read_prepared(smk.input.table, smk.input.pool, smk.input.index)
extract_job.run(card, rows, pool, dict(smk.params.extract), shots, h5s, accuracies, seed=int(smk.params.seed),
                threads=smk.threads)
