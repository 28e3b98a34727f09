"""The cost of a configuration before it is submitted: jobs per rule, GPU and CPU hours, disk.

``make plan CONFIG=config/llama3-8b.yaml`` (scripts/plan.py) dry-runs the workflow with the config in
an empty folder (so every job of the DAG is listed, with the resources each would request), then adds:

* **requested hours**: per rule, the jobs' requested runtime (first attempt) x GPUs, and x CPUs. These
  are upper bounds: a job that finishes early frees its allocation.
* **expected hours**: per rule, from the work of every job (llmscape.cost: prompt tokens of the configured
  protocol x FLOPs per token, training steps x tokens, matrix shapes, the geometry's n^2 d) over a device
  table (llmscape.hardware) x an efficiency measured by a GPU rehearsal of the model where one exists
  (``bench/results/scale_<model>_<gpu>.json``) and assumed, and labelled so, otherwise; GPUs held count.
  Each assumption is printed under the table, with the runtime each resources group should request.
* **disk**: what the results will hold when the DAG is done (nothing is deleted on the way, so this is
  also the peak): the extractions (layers x questions x hidden x bytes), the neighbour lists, the model
  copies (the downloaded base, merged fine-tuning runs and checkpoints, intervention variants), from
  the model's published shape. Checkpoints stored as adapters (``finetune.train.checkpoint_format:
  adapter``, the default) cost their trainable parameters only; the plan shows both formats and marks
  the configured one.

The model's shape comes from a local folder's config.json, or for a hub id from the configurations
that the rehearsal keeps (``bench/configs/*/config.json``, matched by ``_name_or_path``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import cost
from .errors import LlmscapeError

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
GB = 1e9


class PlanError(LlmscapeError, RuntimeError):
    pass


def parse_dryrun(text: str) -> list[dict]:
    """Jobs of ``snakemake -n`` output: rule, resources (ints where they are numbers), wildcards, output files."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", text):
        m = re.match(r"(?:local)?rule (\w+):\n", block)
        if not m:
            continue
        res = {}
        rm = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rm:
            for item in rm.group(1).split(", "):
                k, _, v = item.partition("=")
                res[k] = int(v) if v.isdigit() else v
        wm = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        wc = dict(i.split("=", 1) for i in wm.group(1).split(", ")) if wm else {}
        om = re.search(r"^\s+output: (.*)$", block, re.M)
        jobs.append({"rule": m.group(1), "resources": res, "wildcards": wc,
                     "output": om.group(1).split(", ") if om else []})
    return jobs


def local_rules(root: Path) -> set[str]:
    """Rules declared ``localrules:`` in the workflow (they run in the head process, not as jobs; a dry
    run does not say which)."""
    names: set[str] = set()
    for f in [root / "Snakefile", *sorted((root / "workflow/rules").glob("*.smk"))]:
        for block in re.findall(r"^localrules:\s*\n((?:[ \t]+\w+,?[ \t]*\n)+)", f.read_text(), re.M):
            names |= set(re.findall(r"\w+", block))
    return names


def dryrun(configfiles: list[str | Path], root: Path, extra: list[str] | None = None) -> list[dict]:
    """Every job of the DAG of these config files, from a dry run in an empty folder."""
    with tempfile.TemporaryDirectory(prefix="llmscape-plan-") as wd:
        cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(root / "Snakefile"), "--directory", wd,
               "--cores", "1", "--configfile", *map(str, configfiles),
               "--config", f"resources_dir={root / 'resources'}", *(extra or [])]
        env = dict(os.environ, HF_HUB_OFFLINE="1")  # a plan never downloads: shapes come from config files
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if res.returncode != 0:
        raise PlanError(f"the dry run of {', '.join(map(str, configfiles))} failed:\n"
                        f"{(res.stdout + res.stderr)[-3000:]}")
    return parse_dryrun(res.stdout)


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    params: float
    source: str
    dtype_bytes: int  # of the weights as stored (merged copies are written in the same dtype)
    lora_per_rank: int  # LoRA parameters per unit of rank on q, k, v, o, gate, up, down of every block
    embedding_params: float = 0.0  # input embeddings + an untied LM head
    matrices: tuple = ()  # (rows, columns) of q, k, v, o, gate, up, down of one block


def model_shape(model: str, resources: Path, known: Path) -> Shape | None:
    """Decoder blocks, hidden size and parameter count of ``model``; None when nothing describes it."""
    candidates = [c / "config.json" for c in sorted(known.glob("*")) if c.name == model]  # embedded names
    p = Path(model).expanduser()
    if (p / "config.json").exists():
        candidates.append(p / "config.json")
    candidates.append(resources / "models" / model / "hf" / "config.json")  # an embedded model, converted
    for c in sorted(known.glob("*/config.json")):
        if json.loads(c.read_text()).get("_name_or_path") == model:
            candidates.append(c)
    for c in candidates:
        if c.exists():
            d = json.loads(c.read_text())
            h, f, L, V = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
            heads, kv = d["num_attention_heads"], d.get("num_key_value_heads", d["num_attention_heads"])
            hd = d.get("head_dim") or h // heads
            block = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * f + 2 * h
            params = V * h * (1 if d.get("tie_word_embeddings") else 2) + L * block + h
            per_rank = L * (2 * (h + heads * hd) + 2 * (h + kv * hd) + 3 * (h + f))
            dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
            mats = ((heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (f, h), (f, h), (h, f))
            emb = V * h * (1 if d.get("tie_word_embeddings") else 2)
            return Shape(model, L, h, float(params), str(c), BYTES.get(dtype, 2), per_rank, float(emb), mats)
    return None


def _hours(job: dict, key: str) -> float:
    r = job["resources"]
    return float(r.get("runtime", 0)) / 60 * float(r.get(key, 0) or 0)


def _gpus(job: dict) -> int:
    r = job["resources"]
    if r.get("gpu"):
        return int(r["gpu"])
    m = re.search(r"gpu(?::\w+)?:(\d+)", str(r.get("gres", "")))
    return int(m.group(1)) if m else 0


def plan(configfiles: list[str | Path], root: Path, config: dict) -> dict:
    """The plan as data: per-rule rows, totals, disk, and the assumptions behind them."""
    from .data import analysis_subject_sizes

    jobs = dryrun(configfiles, root)
    local = local_rules(root)
    for j in jobs:
        j["local"] = j["rule"] in local
    rules: dict[str, dict] = {}
    for j in jobs:
        if j["rule"] == "all":
            continue
        r = rules.setdefault(j["rule"], dict(rule=j["rule"], jobs=0, gpus_per_job=0, gpu_hours=0.0,
                                             cpu_hours=0.0, runtime_min=0, local=j["local"]))
        g = _gpus(j)
        r["jobs"] += 1
        r["gpus_per_job"] = max(r["gpus_per_job"], g)
        if not j["local"]:
            r["runtime_min"] = max(r["runtime_min"], int(j["resources"].get("runtime", 0) or 0))
        if not j["local"]:
            r["gpu_hours"] += float(j["resources"].get("runtime", 0)) / 60 * g
            r["cpu_hours"] += _hours(j, "cpus_per_task")
    sizes = analysis_subject_sizes(config["data"])
    n_q = sum(sizes.values()) if sizes else None
    shape = model_shape(config["model"], Path(config.get("resources_dir", root / "resources")), root / "bench/configs")
    if shape is not None and Path(shape.source).is_relative_to(root):
        shape.source = str(Path(shape.source).relative_to(root))
    disk = _disk(jobs, config, shape, n_q)
    expected = _expected(jobs, config, shape, n_q, root, rules)
    return dict(configfiles=[str(c) for c in configfiles], model=config["model"], questions=n_q,
                shape=None if shape is None else shape.__dict__,
                rules=sorted(rules.values(), key=lambda r: -r["gpu_hours"] - r["cpu_hours"] / 100),
                totals=dict(jobs=sum(r["jobs"] for r in rules.values()),
                            gpu_hours=sum(r["gpu_hours"] for r in rules.values()),
                            cpu_hours=sum(r["cpu_hours"] for r in rules.values()),
                            exp_gpu_hours=sum(r.get("exp_gpu_hours", 0.0) for r in rules.values()),
                            exp_cpu_hours=sum(r.get("exp_cpu_hours", 0.0) for r in rules.values())),
                disk=disk, expected=expected)


def _disk(jobs, config, shape: Shape | None, n_q: int | None) -> dict:
    """Bytes the results will hold, by kind, in both checkpoint formats."""
    if shape is None or n_q is None:
        return dict(note="unknown: the model's shape or the number of questions is not known before the run")
    store = BYTES[config["extract"]["store_dtype"]]
    n_ext = sum(len(cost.extract_job_shots(j)) for j in jobs if cost.is_extract(j["rule"]))
    g = config["geometry"]
    knn_cols = g["overlap_k"] * (2 if g["n_boot"] else 1)
    weights = shape.dtype_bytes
    runs = [j["wildcards"].get("run", "") for j in jobs if j["rule"] == "finetune"]
    ft = config["finetune"]
    ckpts = int(ft["train"]["n_checkpoints"]) if ft["checkpoint_spectra"] else 0
    interventions = sum(j["rule"] == "intervene" for j in jobs)
    # an adapter: LoRA-sized at the run's rank (64 where the run name has none) on all seven module types,
    # in fp32 -- an upper bound for the methods that adapt fewer matrices
    ranks = [int(m.group(1)) if (m := re.search(r"-r(\d+)-", r)) else 64 for r in runs]
    adapters = sum(r * shape.lora_per_rank * 4 for r in ranks)
    out = dict(
        extractions=n_ext * (shape.layers + 1) * n_q * shape.hidden * store,
        neighbour_lists=sum(j["rule"] == "geometry" for j in jobs) * (shape.layers + 1) * n_q * knn_cols * 4,
        base_model=shape.params * weights,
        interventions=interventions * shape.params * weights,
        finetune_merged=len(runs) * (1 + ckpts) * shape.params * weights,
        finetune_adapters=(1 + ckpts) * adapters,
    )
    common = out["extractions"] + out["neighbour_lists"] + out["base_model"] + out["interventions"]
    out["checkpoint_format"] = config["finetune"]["train"]["checkpoint_format"]
    out["total_merged"] = common + out["finetune_merged"]
    out["total_adapters"] = common + out["finetune_adapters"]
    out["assumptions"] = (f"{shape.name}: {shape.layers} blocks, hidden {shape.hidden}, {shape.params / 1e9:.2f} B "
                          f"parameters ({shape.source}); {n_q} questions; weights {weights} bytes; states "
                          f"{store} bytes; {len(runs)} fine-tuning runs x (1 + {ckpts} checkpoints); an adapter "
                          "counted as LoRA at the run's rank on all seven module types, fp32 (an upper bound)")
    return out


SAFETY = 2.0  # requested runtime = SAFETY x the longest expected job of a rule (retries double it again)
STEP_MIN = 5  # runtimes are suggested in steps of this many minutes


def _expected(jobs, config, shape, n_q, root: Path, rules: dict) -> dict:
    """Expected GPU and CPU hours per rule from the work of every job (llmscape.cost), and the notes
    (assumptions, sources) behind them; fills ``exp_*`` keys of ``rules``."""
    if shape is None or n_q is None:
        return dict(notes=["expected hours: not modelled (the model's shape or the number of questions is unknown)"])
    res_dir = Path(config.get("resources_dir", root / "resources"))
    tokens = cost.prompt_tokens(config, res_dir, config["extract"]["shots"])
    name = Path(shape.source).parent.name  # the rehearsal's name for this model (bench/configs/<name>)
    by_gpu: dict = {}
    longest: dict[str, float] = {}  # expected seconds of the longest job per resources group
    notes = list(tokens["notes"])
    geo = cost.geometry_calibration(root)
    notes.append(geo[2] if geo else "geometry: no CPU measurement of the geometry (bench/scale.py): not modelled")
    for j in jobs:
        r = rules.get(j["rule"])
        if r is None or r["local"]:
            continue
        gm = str(j["resources"].get("gpu_model") or "a100")
        if gm not in by_gpu:
            ex = config["extract"]
            by_gpu[gm] = cost.rates(root, name, gm, bool(ex["prefix_sharing"]), ex["shot_order"])
        held = [n for n in by_gpu[gm].notes if _gpus(j) or n.startswith("CPU")]  # a CPU job: no GPU notes
        notes += [n for n in held if n not in notes]
        ctx = cost.Context(config, shape, by_gpu[gm], tokens, n_q, geo)
        job = dict(j, gpus=_gpus(j), cpus=int(j["resources"].get("cpus_per_task", 1) or 1))
        sec = cost.job_seconds(ctx, job)
        if sec is None:
            r["exp_missing"] = r.get("exp_missing", 0) + 1
            continue
        r["exp_gpu_hours"] = r.get("exp_gpu_hours", 0.0) + sec / 3600 * job["gpus"]
        r["exp_cpu_hours"] = r.get("exp_cpu_hours", 0.0) + sec / 3600 * job["cpus"]
        r["exp_max_min"] = max(r.get("exp_max_min", 0.0), sec / 60)
        group = j["rule"]  # a job over every shot count of a variant reads resources.extract
        if cost.is_extract(group):
            group = f"extract_{j['wildcards']['shots']}shot" if "shots" in j["wildcards"] else "extract"
        longest[group] = max(longest.get(group, 0.0), sec)
    suggested = {g: cost.ceil_minutes(SAFETY * s, STEP_MIN) for g, s in longest.items()}
    for r in rules.values():
        if "exp_max_min" in r and not r.get("exp_missing"):
            r["suggested_runtime_min"] = cost.ceil_minutes(SAFETY * r["exp_max_min"] * 60, STEP_MIN)
    notes.append(f"per job: {cost.START_S:.0f} s start-up and the weights read at {cost.READ_GBS:g} GB/s (assumed); "
                 f"suggested runtime = {SAFETY:g} x the longest expected job, in {STEP_MIN} min steps")
    return dict(notes=notes, suggested_runtime_min=suggested,
                suggested_mem_mb=dict(extract=cost.extract_host_mb(shape, n_q, config),
                                      finetune=cost.finetune_host_mb(shape, config)))


def format_plan(p: dict) -> str:
    lines = [f"Plan for {', '.join(p['configfiles'])}: model {p['model']}, "
             f"{p['questions'] if p['questions'] is not None else 'an unknown number of'} analysis questions", "",
             "| rule | jobs | GPUs per job | requested runtime per job | GPU hours (requested) | CPU hours (requested) "
             "| expected GPU h | expected CPU h | longest job (expected) | suggested runtime |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rules"]:
        if r["local"]:
            lines.append(f"| {r['rule']} (in the head process) | {r['jobs']} | - | - | - | - | - | - | - | - |")
            continue
        if "exp_max_min" in r and not r.get("exp_missing"):
            exp = (f"{r['exp_gpu_hours']:.1f} | {r['exp_cpu_hours']:.1f} | {r['exp_max_min']:.0f} min | "
                   f"{r['suggested_runtime_min']} min")
        else:
            exp = "not modelled | not modelled | - | -"
        lines.append(f"| {r['rule']} | {r['jobs']} | {r['gpus_per_job']} | {r['runtime_min']} min | "
                     f"{r['gpu_hours']:.1f} | {r['cpu_hours']:.1f} | {exp} |")
    t = p["totals"]
    lines.append(f"| all | {t['jobs']} | | | {t['gpu_hours']:.1f} | {t['cpu_hours']:.1f} | "
                 f"{t['exp_gpu_hours']:.1f} | {t['exp_cpu_hours']:.1f} | | |")
    lines.append("")
    lines += [f"Assumption: {n}." for n in p["expected"]["notes"]]
    sug = p["expected"].get("suggested_runtime_min")
    if sug:
        lines.append("Suggested runtime (resources.<group>.runtime, minutes): "
                     + ", ".join(f"{g} {m}" for g, m in sorted(sug.items())) + "; host memory (mem_mb, "
                     f"{cost.MEM_SAFETY:g} x weights + buffers): "
                     + ", ".join(f"{g} {m}" for g, m in p["expected"]["suggested_mem_mb"].items()) + ".")
    d = p["disk"]
    if "note" in d:
        lines.append(f"Disk: {d['note']}")
    else:
        fmt = d["checkpoint_format"]
        lines += ["", "| results | merged checkpoints" + (" (configured)" if fmt == "merged" else "") +
                  " | adapter checkpoints" + (" (configured)" if fmt == "adapter" else "") + " |", "|---|---|---|"]
        for key, label in (("extractions", "extractions (HDF5)"), ("neighbour_lists", "neighbour lists"),
                           ("base_model", "base model"), ("interventions", "intervention variants")):
            lines.append(f"| {label} | {_gb(d[key])} | {_gb(d[key])} |")
        lines.append(f"| fine-tuning runs and checkpoints | {_gb(d['finetune_merged'])} "
                     f"| {_gb(d['finetune_adapters'])} |")
        lines.append(f"| **total (= peak)** | **{_gb(d['total_merged'])}** | **{_gb(d['total_adapters'])}** |")
        lines.append(f"Assumptions: {d['assumptions']}.")
    return "\n".join(lines)


def _gb(b: float) -> str:
    return f"{b / GB:,.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:,.0f} MB"


