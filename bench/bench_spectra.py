"""Benchmark: whole-model weight spectra with llmscape vs weightwatcher 0.7.7 ``analyze()``, same machine,
same process, ``--repeats`` alternated rounds (bench/common.py: medians, spread, load, busy runs marked).

    python3 bench/bench_spectra.py                       # the embedded SmolLM2-135M, CPU
    python3 bench/bench_spectra.py --random-like DIR     # a random model with the folder's config (e.g. on a GPU box)

Times (wall and process CPU) of the two alternate, so a slow spell of a shared machine hits both; the
reported times are medians and the speed-up is also given per round. weightwatcher's time
excludes loading the torch model (llmscape's includes reading the safetensors). Agreement is checked on
the matrices both analyse, for the metrics whose definitions are the same: alpha (our alpha_ks, the KS
x_min scan), stable rank, squared norms, alpha_weighted, log_alpha_norm, x_min, D, tail size, rank and
entropy. Writes ``bench/results/spectra.json`` and ``bench/results/spectra.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import common as B  # bench/common.py: alternation, load, median and spread

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def random_like(folder: Path, dest: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def first_blocks(folder: Path, blocks: int, dest: Path) -> Path:
    """A copy of a model folder with its first ``blocks`` decoder blocks only (the embeddings, the final
    norm and the head kept): the same real matrices for both tools, in a fraction of the time."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    if blocks >= int(cfg["num_hidden_layers"]):
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    kept = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m is None or int(m.group(1)) < blocks:
                kept[name] = t
    save_file(kept, dest / "model.safetensors", metadata={"format": "pt"})
    cfg["num_hidden_layers"] = blocks
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json",):
        if (folder / extra).exists():
            shutil.copy(folder / extra, dest / extra)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m/hf"))
    ap.add_argument("--random-like", default=None, help="config.json folder: benchmark a random model of that shape")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs both, alternating")
    ap.add_argument("--blocks", type=int, default=None,
                    help="only the first N decoder blocks (plus the embeddings) for both tools; make bench uses 8 "
                         "so that every benchmark fits 15 minutes (the speed-up is also given per matrix)")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from llmscape.devices import pick_device
    from llmscape.spectra import stream

    folder = Path(args.model_dir)
    label = folder.parent.name if folder.name == "hf" else folder.name
    if args.random_like:
        folder = random_like(Path(args.random_like), Path(tempfile.mkdtemp()) / "hf")
        label = f"random-like:{Path(args.random_like).parent.name}"
    dev = pick_device(args.device, key="--device")
    if args.blocks:
        folder = first_blocks(folder, args.blocks, Path(tempfile.mkdtemp()) / "hf")
        label = f"{label} (first {args.blocks} blocks)"

    def ours():
        return stream.compute_spectra(folder, label, "base", device=dev, include_embeddings=True)

    ours()  # warm-up (imports, LAPACK/cuSOLVER initialisation); not timed

    import weightwatcher as ww
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if dev.startswith("cuda"):
        model.to(dev)
    watcher = ww.WeightWatcher(model=model)
    kept = {}

    def with_cpu(fn, key):
        def go():
            c0 = time.process_time()
            kept[key] = fn()
            return dict(cpu_s=time.process_time() - c0)
        return go

    where = B.machine()
    runs = B.alternate({"weightwatcher": with_cpu(watcher.analyze, "details"),
                        "llmscape": with_cpu(ours, "df")}, args.repeats)
    del model, watcher
    df, details = kept["df"], kept["details"]
    w_ours, c_ours = B.summary(runs["llmscape"])["median"], B.summary(runs["llmscape"], "cpu_s")["median"]
    w_ww, c_ww = B.summary(runs["weightwatcher"])["median"], B.summary(runs["weightwatcher"], "cpu_s")["median"]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    df["longname"] = df["name"].str.replace(r"\.weight$", "", regex=True)
    wwd = details.rename(columns={c: f"ww_{c}" for c in details.columns if c != "longname"})
    m = wwd.merge(df, on="longname")
    pairs = {  # weightwatcher column -> our column (same definition)
        "alpha": "alpha_ks", "stable_rank": "stable_rank", "norm": "fro_norm_sq", "lambda_max": "lambda_max",
        "log_norm": "log_norm", "log_spectral_norm": "log_spectral_norm", "alpha_weighted": "alpha_weighted",
        "log_alpha_norm": "log_alpha_norm", "xmin": "xmin", "D": "ks_distance", "num_pl_spikes": "num_pl_spikes",
        "matrix_rank": "rank", "entropy": "entropy",
    }
    m["lambda_max"] = m["spectral_norm"].astype(float) ** 2
    agreement = {}
    for a, b in pairs.items():
        if f"ww_{a}" not in m.columns:
            continue
        a = f"ww_{a}"
        x, y = m[a].astype(float).to_numpy(), m[b].astype(float).to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        rel = np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-300)
        agreement[f"{a[3:]} vs {b}"] = dict(n=int(ok.sum()), max_rel_err=float(rel.max()) if rel.size else None,
                                        median_rel_err=float(np.median(rel)) if rel.size else None,
                                        frac_within_1e6=float((rel < 1e-6).mean()) if rel.size else None)
    ww_only = sorted(set(details["longname"]) - set(df["longname"]))
    result = dict(
        model=label, folder=str(folder), device=dev, torch_threads=args.threads, machine=platform.node(),
        cpu=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
        weightwatcher=ww.__version__, torch=torch.__version__,
        blocks=args.blocks, llmscape_matrices=int(len(df)), weightwatcher_layers=int(len(details)), matched=int(len(m)),
        weightwatcher_only=ww_only,
        repeats=args.repeats, machine_record=where, runs=runs,
        seconds={m: B.summary(r) for m, r in runs.items()},
        cpu_seconds={m: B.summary(r, "cpu_s") for m, r in runs.items()},
        speedup_wall_rounds=B.ratio(runs["weightwatcher"], runs["llmscape"]),
        speedup_cpu_rounds=B.ratio(runs["weightwatcher"], runs["llmscape"], "cpu_s"),
        llmscape_wall_s=w_ours, llmscape_cpu_s=c_ours, weightwatcher_wall_s=w_ww, weightwatcher_cpu_s=c_ww,
        speedup_wall=w_ww / w_ours, speedup_cpu=c_ww / c_ours if c_ours > 0 else None,
        speedup_wall_per_matrix=(w_ww / len(details)) / (w_ours / len(df)),
        peak_rss_mb=peak_rss_mb, agreement=agreement,
        note="medians of alternated rounds; weightwatcher timed without model loading; llmscape includes "
             "safetensors reading and all llmscape metrics (3 alphas, MP fits, spikes); a warm-up run was excluded.",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if not args.random_like else "_random"
    suffix += "" if dev == "cpu" else f"_{dev.split(':')[0]}"
    (out / f"spectra{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{label} on {dev} ({args.threads} torch threads), {len(df)} llmscape matrices, "
          f"{len(details)} weightwatcher layers ({len(m)} matched; weightwatcher only: {', '.join(ww_only) or '-'})")
    print(f"{'':24s}{'wall s':>10s}{'cpu s':>10s}")
    print(f"{'llmscape (median)':24s}{w_ours:10.2f}{c_ours:10.2f}")
    print(f"{'weightwatcher analyze()':24s}{w_ww:10.2f}{c_ww:10.2f}")
    print(f"{'speed-up':24s}{w_ww / w_ours:10.1f}x{(c_ww / c_ours if c_ours else float('nan')):9.1f}x")
    print(f"speed-up per alternated round, wall: {B.fmt(result['speedup_wall_rounds'], 'x')}; "
          f"CPU: {B.fmt(result['speedup_cpu_rounds'], 'x')}")
    print(f"\n{'metric (ww vs ours)':40s}{'n':>5s}{'max rel err':>14s}{'median':>12s}")
    for k, v in agreement.items():
        print(f"{k:40s}{v['n']:5d}{v['max_rel_err']:14.2e}{v['median_rel_err']:12.2e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    ax[0].bar(["llmscape", "weightwatcher\nanalyze()"], [w_ours, w_ww], color=["tab:blue", "tab:gray"])
    ax[0].set_ylabel("wall time (s)")
    ax[0].set_title(f"{label}, {dev}: {w_ww / w_ours:.1f}x faster", fontsize=9)
    for a, (x, y, name) in zip(ax[1:], [("alpha", "alpha_ks", "Hill alpha (KS x_min)"),
                                         ("stable_rank", "stable_rank", "stable rank")], strict=True):
        a.scatter(m[f"ww_{x}"], m[y].astype(float), s=8)
        lo, hi = float(np.nanmin(m[f"ww_{x}"])), float(np.nanmax(m[f"ww_{x}"]))
        a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        a.set_xlabel(f"weightwatcher {x}")
        a.set_ylabel(f"llmscape {y}")
        a.set_title(f"{name}: max rel. diff {agreement[f'{x} vs {y}']['max_rel_err']:.1e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"spectra{suffix}.png", dpi=110)
    print(f"\nwrote {out / f'spectra{suffix}.json'} and .png")


if __name__ == "__main__":
    main()
