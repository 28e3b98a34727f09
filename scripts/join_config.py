"""Rule join_config: the effective configuration (config files + defaults filled in by the schema) as an
HTML page for the report."""

from llmscape import rulekit

log = rulekit.start(snakemake, "join")  # noqa: F821

from llmscape.join.report import config_html  # noqa: E402

smk = snakemake  # noqa: F821
config_html(dict(smk.params.config), list(smk.params.configfiles), smk.output.html)
log.info("wrote %s", smk.output.html)
