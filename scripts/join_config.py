"""Rule join_config: the effective configuration (config files + defaults filled in by the schema) as an
HTML page for the report."""

from llmscape import rulekit

log = rulekit.start(snakemake, "join")

from llmscape.join.report import config_html

smk = snakemake
config_html(dict(smk.params.config), list(smk.params.configfiles), smk.output.html)
log.info("wrote %s", smk.output.html)
