"""The README's benchmark table, written from bench/results/*.json (the last `make bench`).

    python3 bench/readme_table.py            # rewrite the table between the markers in README.md
    python3 bench/readme_table.py --print    # print it instead

Only figures a benchmark file holds go into the table, each with its date, the machine's cores and
whether its rounds ran on a busy machine (bench/common.py marks a round busy when the 1-minute load
average before or during it exceeds half a load per core). A benchmark without a results file, or with
one of an older format, gets a row saying so rather than a number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench-table:start (bench/readme_table.py) -->", "<!-- bench-table:end -->"
HEADER = ["| stage | baseline (same run) | llmscape | target | equal results |", "|---|---|---|---|---|"]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _load_note(runs: list[dict]) -> str:
    """How busy the machine was: from the other processes' CPU where the runs recorded it, else the range
    of the load average (which includes the benchmark's own threads)."""
    if not runs:
        return "load not recorded"
    if all(r.get("other_cores") is not None for r in runs):
        busy = sum(bool(r.get("busy")) for r in runs)
        most = max(r["other_cores"] for r in runs)
        return f"{busy} of {len(runs)} runs on a busy machine (other processes: at most {most:.2f} cores)"
    loads = [x for r in runs for x in (r.get("load_before"), r.get("load_during_max")) if x is not None]
    return f"1-minute load {min(loads):.1f}-{max(loads):.1f}, the benchmark's own threads included"


def _runs(runs: dict | list | None) -> list[dict]:
    if isinstance(runs, list):
        return [r for r in runs if isinstance(r, dict)]
    return [r for rs in (runs or {}).values() for r in (rs if isinstance(rs, list) else []) if isinstance(r, dict)]


def _when(machine: dict | None, runs: dict | list | None = None) -> str:
    """'2026-12-05, 2 cores, <load note>' from bench/common.py's machine record and runs."""
    if not machine:
        return "date and load not recorded"
    return f"{str(machine.get('date', '?'))[:10]}, {machine.get('cores', '?')} cores, {_load_note(_runs(runs))}"


def _kernels(machine: dict) -> str:
    """'; OpenBLAS kernels Haswell (set by OPENBLAS_CORETYPE), torch's AVX512' from the machine record,
    '' where it was not recorded: the published way multiplies through OpenBLAS, ours through oneDNN."""
    k = machine.get("kernels") or {}
    if not k.get("openblas"):
        return ""
    held = " (set by OPENBLAS_CORETYPE)" if k.get("OPENBLAS_CORETYPE") else ""
    return f"; OpenBLAS kernels {'/'.join(k['openblas'])}{held}, torch's {k.get('torch_cpu_capability', '?')}"


def _med(s: dict, unit: str = " s", digits: int = 1) -> str:
    return f"{s['median']:.{digits}f}{unit} (spread {100 * s['spread']:.0f}%)"


def extract_row(d: dict) -> list[str]:
    sec, tps = d["seconds"], d["tokens_per_s"]
    return [
        f"extraction, SmolLM2-135M, {d['shots']}-shot, {d['questions']} questions, {d['threads']} CPU threads "
        f"(`bench/bench_extract.py`, {d['repeats']} alternated rounds, {_when(d.get('machine'), d.get('runs'))})",
        f"batch of one, full prompt, all positions: {_med(sec['published'])}, {d['tokens']['published']:,} tokens, "
        f"{tps['published']['median']:.0f} tokens/s",
        f"{_med(sec['llmscape'])}, {d['tokens']['llmscape']:,} tokens, {tps['llmscape']['median']:.0f} tokens/s: "
        f"**{d['speedup']['median']:.1f}x** (per round {d['speedup']['min']:.1f}-{d['speedup']['max']:.1f}x; ceiling "
        f"{d['flop_ratio']:.1f}x from the FLOPs); per token {d['per_token_speed']['median']:.2f}x the published rate",
        "5.5x",
        f"max abs deviation {d['max_abs_deviation']:.1e} (rel {d['max_rel_deviation']:.1e})",
    ]


def spectra_row(d: dict) -> list[str]:
    if "seconds" not in d:
        return _stale("spectra", "bench_spectra.py")
    blocks = f"first {d['blocks']} blocks, " if d.get("blocks") else ""
    worst = max((v["max_rel_err"] for k, v in d["agreement"].items() if v.get("max_rel_err") is not None
                 and k.split(" vs ")[0] in ("alpha", "stable_rank")), default=float("nan"))
    return [
        f"spectra, SmolLM2-135M ({blocks}{d['llmscape_matrices']} matrices; `bench/bench_spectra.py`, "
        f"{d['repeats']} alternated rounds, {_when(d.get('machine_record'), d.get('runs'))})",
        f"weightwatcher {d['weightwatcher']} `analyze()`: {_med(d['seconds']['weightwatcher'])}",
        f"{_med(d['seconds']['llmscape'])}: **{d['speedup_wall_rounds']['median']:.1f}x** wall (per round "
        f"{d['speedup_wall_rounds']['min']:.1f}-{d['speedup_wall_rounds']['max']:.1f}x), "
        f"{d['speedup_cpu_rounds']['median']:.1f}x CPU time",
        "5x",
        f"alpha and stable rank within {worst:.1e}",
    ]


def finetune_row(d: dict) -> list[str]:
    env, rows = d["env"], d["rows"]
    if "machine" not in env:
        return _stale("finetune", "bench_finetune.py")
    runs = {r["label"]: r.get("runs", []) for r in rows}
    ref = rows[0]
    others = ", ".join(f"{r['method']} {r['throughput_vs_lora']:.2f}x" for r in rows[1:])
    return [
        f"fine-tuning throughput, {ref['trainable'] / 1e6:.2f} M trainable parameters each "
        f"(`bench/bench_finetune.py`, {env['steps']} steps, {env.get('cpu_threads', 1)} torch thread(s) per run, "
        f"{env['repeats']} alternated rounds, "
        f"{_when(env['machine'], runs)})",
        f"peft LoRA r=8: {ref['tokens_per_s']:.0f} tokens/s",
        others,
        "reported",
        "-",
    ]


def geometry_row(d: dict) -> list[str]:
    results = d.get("results") or {}
    if "machine" not in d or not results:
        return _stale("geometry", "bench_geometry.py")
    runs = [run for r in results.values() for m in ("published", "ours") for run in r[m].get("runs", [])]
    cases, pub, ours = [], [], []
    for name, r in results.items():
        line = f"{name} ({r['shape']}): {r['speedup']:.1f}x"
        w = r.get("with_intervals")
        if w:
            star = "*" if w.get("published_computed") else ""
            line += f"; with {w['n_boot']} subsamples on {len(w['layers'])} layer(s): {w['speedup']:.1f}x{star}"
            pub.append(f"{name}: {r['published']['wall_s']:.1f} s; with subsamples "
                       f"{w['published']['wall_s']:.0f} s{star}")
        else:
            pub.append(f"{name}: {r['published']['wall_s']:.1f} s")
        cases.append(line)
        ours.append(f"{r['ours']['wall_s']:.1f} s")
    worst = {}
    for r in results.values():
        for col, v in (r.get("agreement") or {}).items():
            if v.get("max_abs_diff") is not None:
                worst[col] = max(worst.get(col, 0.0), v["max_abs_diff"])
    exact = [c for c, v in worst.items() if v == 0]
    inexact = ", ".join(f"{c} {v:.0e}" for c, v in worst.items() if v)
    computed = ("; * the published way ran a few subsamples and its total is computed from them, not measured"
                if any((r.get("with_intervals") or {}).get("published_computed") for r in results.values()) else "")
    return [
        f"geometry, all layers, median of {d['repeats']} alternated rounds (`bench/bench_geometry.py`, "
        f"{_when(d['machine'], runs)}{_kernels(d['machine'])})",
        "plain dadapy `compute_distances(maxk=1000)` per layer (and per subsample): " + "; ".join(pub),
        "; ".join(f"**{c}**" for c in cases) + f" (ours: {', '.join(ours)}){computed}",
        "5x",
        f"equal: {', '.join(exact) or '-'}; within {inexact or '-'}",
    ]


def intervals_row(d: dict) -> list[str]:
    cases = d.get("cases") or {}
    if not cases:
        return _stale("intervals", "bench_intervals.py")
    base, ours, agree = [], [], []
    for name, c in cases.items():
        m = c["median"]
        base.append(f"{name}: {1000 * m['fresh_per_draw_s']:.0f} ms")
        ours.append(f"{name}: {1000 * m['reuse_per_draw_s']:.0f} ms, **{c['speedup_per_draw']:.1f}x**")
        agree.append(f"{c['exact_mismatches']} of {c['compared_draws']} draws with a different clustering")
    return [
        f"geometry intervals, per subsample (`bench/bench_intervals.py`, "
        f"{_when(d.get('machine_record') or {'date': d.get('date')}, _interval_runs(d))})",
        "a new neighbour graph per subsample: " + "; ".join(base),
        "the graph read from the layer's: " + "; ".join(ours),
        "reported",
        "; ".join(agree),
    ]


def _interval_runs(d: dict) -> list[dict]:
    return [r for c in (d.get("cases") or {}).values() for r in (c.get("runs") or []) if isinstance(r, dict)]


def _stale(name: str, script: str) -> list[str]:
    return [f"{name} (`bench/{script}`)", "no results file of the current format", "rerun `make bench`", "", ""]


def rows() -> list[list[str]]:
    out = []
    for name, fn in (("extract", extract_row), ("geometry", geometry_row), ("intervals", intervals_row),
                     ("spectra", spectra_row), ("finetune", finetune_row)):
        d = _load(name)
        try:
            out.append(fn(d) if d is not None else _stale(name, f"bench_{name}.py"))
        except KeyError:
            out.append(_stale(name, f"bench_{name}.py"))
    return out


def table() -> str:
    return "\n".join(HEADER + ["| " + " | ".join(r) + " |" for r in rows()])


def rewrite(readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} lacks the markers {START} ... {END}. Fix: put them around the benchmark table.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the table instead of rewriting README.md")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    a = ap.parse_args()
    if a.print:
        print(table())
    else:
        rewrite(Path(a.readme))
        print(f"rewrote the benchmark table in {a.readme}")


if __name__ == "__main__":
    main()
