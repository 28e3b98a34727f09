"""Rule prepare_data: MMLU into one normalised table, the few-shot pool and the split index files."""
from pathlib import Path

from llmscape import data, rulekit

log = rulekit.start(snakemake, "prepare_data")
p = snakemake.params
splits = data.prepare(dict(p.data), Path(snakemake.output.table).parent,
                      cache=Path(p.resources_dir) / "data")
log.info("data ready: %s", splits.summary())
