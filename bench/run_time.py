"""Where the time of a DAG run went: the rules' benchmark files, summed per rule.

Every heavy rule writes ``benchmarks/<rule>/.../<job>.tsv`` (Snakemake's ``benchmark:``: wall seconds,
peak RSS, CPU seconds). This prints one row per rule: jobs, wall seconds summed over its jobs (jobs
that ran side by side count each), the longest job, CPU seconds and the largest peak RSS, as a
Markdown table, largest first.

    python3 bench/run_time.py [benchmarks/]
"""

from __future__ import annotations

import sys
from pathlib import Path


def summarise(folder: str | Path):
    import pandas as pd

    folder = Path(folder)
    rows = []
    for tsv in sorted(folder.rglob("*.tsv")):
        t = pd.read_csv(tsv, sep="\t")
        if t.empty:
            continue
        last = t.iloc[-1]  # the last repeat
        rows.append(dict(rule=tsv.relative_to(folder).parts[0], job=str(tsv.relative_to(folder)),
                         wall_s=float(last["s"]), cpu_s=float(last.get("cpu_time", float("nan"))),
                         max_rss_mb=float(last.get("max_rss", float("nan")))))
    if not rows:
        raise SystemExit(f"no benchmark files under {folder}: run the DAG first")
    jobs = pd.DataFrame(rows)
    per_rule = jobs.groupby("rule").agg(jobs=("job", "size"), wall_s=("wall_s", "sum"), longest_s=("wall_s", "max"),
                                        cpu_s=("cpu_s", "sum"), max_rss_mb=("max_rss_mb", "max"))
    return per_rule.sort_values("wall_s", ascending=False).reset_index()


def main() -> None:
    table = summarise(sys.argv[1] if len(sys.argv) > 1 else "benchmarks")
    total = table["wall_s"].sum()
    print("| rule | jobs | wall, summed over jobs | longest job | CPU | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.rule} | {r.jobs} | {r.wall_s / 60:.1f} min ({100 * r.wall_s / total:.0f}%) | "
              f"{r.longest_s / 60:.1f} min | {r.cpu_s / 60:.1f} min | {r.max_rss_mb / 1024:.1f} GB |")
    print(f"| all benchmarked rules | {int(table['jobs'].sum())} | {total / 60:.1f} min | | "
          f"{table['cpu_s'].sum() / 60:.1f} min | |")


if __name__ == "__main__":
    main()
