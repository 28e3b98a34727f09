"""Report helpers: the effective configuration as HTML (Snakemake 9's HTML report lists no config files,
so the join stage adds one), atomic CSV writing, and the check the end-to-end test runs on report.html."""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from ..io import atomic_path

#: what `snakemake --report` must contain once the join stage ran (report() outputs of join.smk)
JOIN_ENTRIES = (
    "heatmap.png", "id_alpha.png", "ari.png", "accuracy_trainable.png", "interventions.png", "trajectories.png",
    "variants.csv", "correlations_top.csv", "delta_correlations.csv", "intervention_effects.csv",
    "trajectory_correlations.csv", "config.html",
)
#: the geometry's paired differences (rule geometry_paired), shown beside the join's entries
PAIRED_ENTRIES = ("paired_summary.csv", "paired_accuracy.csv", "paired_shots.png", "paired_shots_step.png",
                  "paired_variant.png", "paired_layer.png")
#: the front page's headline figure (rule geometry_headline), also listed as a result
HEADLINE_ENTRIES = ("headline.html",)
#: the replication across subject sets (rule replication_summary; configs with geometry.replication.sets, as CI's)
REPLICATION_ENTRIES = ("replication.csv", "replication_ari.png")
REPORT_ENTRIES = JOIN_ENTRIES + PAIRED_ENTRIES + HEADLINE_ENTRIES + REPLICATION_ENTRIES
#: rules whose runtimes the report's statistics must list
JOIN_RULES = ("join_tables", "correlate", "plot_join")
REPORT_RULES = JOIN_RULES + ("geometry_paired", "geometry_headline", "replication_summary")


def write_csv(df, dest) -> Path:
    with atomic_path(dest, suffix=".tmp.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return Path(dest)


def config_html(config: dict, configfiles: list[str], dest) -> Path:
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    files = "".join(f"<li><code>{html.escape(str(f))}</code></li>" for f in configfiles)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>llmscape configuration</title></head><body>"
        "<h2>Effective configuration</h2><p>Config files, later ones overriding earlier ones (command-line "
        f"<code>--config</code> values on top); schema defaults filled in:</p><ul>{files}</ul>"
        f"<pre>{html.escape(text)}</pre></body></html>\n"
    )
    with atomic_path(dest, suffix=".tmp.html") as tmp:
        tmp.write_text(page)
    return Path(dest)


def check_report(path, entries=REPORT_ENTRIES, rules=REPORT_RULES) -> list[str]:
    """Problems of a generated report.html (empty list = fine): every entry and rule runtime present
    (by default those of the whole DAG; a report of the join rules alone: JOIN_ENTRIES, JOIN_RULES).

    Use in the end-to-end test: ``assert not check_report(workdir / "report.html")``."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return [f"{p} missing or empty"]
    text = p.read_text(errors="replace")
    problems = [f"report lacks {e}" for e in entries if e not in text]
    problems += [f"report lacks the runtime of rule {r}" for r in rules if f'"rule": "{r}"' not in text
                 and f'"rule":"{r}"' not in text]
    return problems
