"""The cost of a configuration before it is submitted: jobs per rule, GPU and CPU hours, disk.

``make plan CONFIG=config/llama3-8b.yaml`` (scripts/plan.py) dry-runs the workflow with the config in
an empty folder (so every job of the DAG is listed, with the resources each would request), then adds:

* **requested hours**: per rule, the jobs' requested runtime (first attempt) x GPUs, and x CPUs. These
  are upper bounds: a job that finishes early frees its allocation.
* **expected hours** where a scale rehearsal of this model measured the rate on a GPU
  (``bench/results/scale_<model>_cuda.json``, from ``bench/scale.py --device cuda``): extraction from
  the prompts' token counts over the measured tokens/s; otherwise "no rehearsal", never a guess.
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
from .errors import LlmscapeError

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
GB = 1e9


class PlanError(LlmscapeError, RuntimeError):
    pass


def parse_dryrun(text: str) -> list[dict]:
    """Jobs of ``snakemake -n`` output: rule, resources (ints where they are numbers), wildcards."""
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
        jobs.append({"rule": m.group(1), "resources": res, "wildcards": wc})
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
        raise PlanError(f"the dry run of {', '.join(map(str, configfiles))} failed:\n{(res.stdout + res.stderr)[-3000:]}")
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
            return Shape(model, L, h, float(params), str(c), BYTES.get(dtype, 2), per_rank)
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
    expected = _expected(jobs, config, shape, n_q, root)
    return dict(configfiles=[str(c) for c in configfiles], model=config["model"], questions=n_q,
                shape=None if shape is None else shape.__dict__, rules=sorted(rules.values(), key=lambda r: -r["gpu_hours"] - r["cpu_hours"] / 100),
                totals=dict(jobs=sum(r["jobs"] for r in rules.values()),
                            gpu_hours=sum(r["gpu_hours"] for r in rules.values()),
                            cpu_hours=sum(r["cpu_hours"] for r in rules.values())),
                disk=disk, expected=expected)


def _disk(jobs, config, shape: Shape | None, n_q: int | None) -> dict:
    """Bytes the results will hold, by kind, in both checkpoint formats."""
    if shape is None or n_q is None:
        return dict(note="unknown: the model's shape or the number of questions is not known before the run")
    store = BYTES[config["extract"].get("store_dtype", "float32")]
    n_ext = sum(j["rule"] == "extract" for j in jobs)
    g = config["geometry"]
    knn_cols = g.get("overlap_k", 30) * (2 if g.get("n_boot", 0) else 1)
    weights = shape.dtype_bytes
    runs = [j["wildcards"].get("run", "") for j in jobs if j["rule"] == "finetune"]
    ckpts = int(config["finetune"].get("train", {}).get("n_checkpoints", 4)) if config["finetune"].get("checkpoint_spectra", True) else 0
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
    out["checkpoint_format"] = config["finetune"].get("train", {}).get("checkpoint_format", "adapter")
    out["total_merged"] = common + out["finetune_merged"]
    out["total_adapters"] = common + out["finetune_adapters"]
    out["assumptions"] = (f"{shape.name}: {shape.layers} blocks, hidden {shape.hidden}, {shape.params / 1e9:.2f} B "
                          f"parameters ({shape.source}); {n_q} questions; weights {weights} bytes; states "
                          f"{store} bytes; {len(runs)} fine-tuning runs x (1 + {ckpts} checkpoints); an adapter "
                          "counted as LoRA at the run's rank on all seven module types, fp32 (an upper bound)")
    return out


def _expected(jobs, config, shape, n_q, root: Path) -> dict:
    """Expected GPU hours of the extraction from a GPU rehearsal of this model, if one was measured."""
    if shape is None:
        return dict(note="no model shape: nothing to compare with a rehearsal")
    name = Path(shape.source).parent.name  # the rehearsal's name for this model (bench/configs/<name>)
    f = root / "bench/results" / f"scale_{name}_cuda.json"
    if not f.exists():
        return dict(note=f"no GPU rehearsal of {name} yet (bench/scale.py --device cuda --model {name} writes "
                         f"{f.relative_to(root)}): the hours above are the requested upper bounds")
    r = json.loads(f.read_text())
    ex = r.get("extraction", {})
    if "measured" not in ex or n_q is None:
        return dict(note=f"{f.name} has no extraction measurement")
    shared = config["extract"].get("prefix_sharing", True) and config["extract"].get("shot_order") == "fixed"
    mode = "prefix_shared" if shared else "no_sharing"
    rate = ex["measured"]["runs"][mode]["tokens_per_s"]
    depth = r["model_built"]["layers_full"] / r["model_built"]["layers_built"]
    per_q = {k: ex["extrapolated"]["tokens"][f"{k}shot_{mode}"] / ex["extrapolated"]["questions"] for k in (0, 5)}
    hours = 0.0
    for j in jobs:
        if j["rule"] == "extract":
            k = int(j["wildcards"]["shots"])
            tokens = n_q * (per_q[0] + (per_q[5] - per_q[0]) * k / 5)  # linear in the shots between 0 and 5
            hours += tokens / (rate / depth) / 3600
    return dict(extract_gpu_hours=hours, source=str(f.relative_to(root)), gpu=r["device"]["name"],
                rule=f"prompt tokens ({mode}, linear in shots between the rehearsal's 0- and 5-shot counts) / "
                     f"tokens per second measured on {r['device']['name']}" + (
                         f", scaled by depth x{depth:g}" if depth != 1 else ""))


def format_plan(p: dict) -> str:
    lines = [f"Plan for {', '.join(p['configfiles'])}: model {p['model']}, "
             f"{p['questions'] if p['questions'] is not None else 'an unknown number of'} analysis questions", "",
             "| rule | jobs | GPUs per job | requested runtime per job | GPU hours (requested) | CPU hours (requested) |",
             "|---|---|---|---|---|---|"]
    for r in p["rules"]:
        if r["local"]:
            lines.append(f"| {r['rule']} (in the head process) | {r['jobs']} | - | - | - | - |")
            continue
        lines.append(f"| {r['rule']} | {r['jobs']} | {r['gpus_per_job']} | {r['runtime_min']} min | "
                     f"{r['gpu_hours']:.1f} | {r['cpu_hours']:.1f} |")
    t = p["totals"]
    lines.append(f"| all | {t['jobs']} | | | {t['gpu_hours']:.1f} | {t['cpu_hours']:.1f} |")
    lines.append("")
    e = p["expected"]
    lines.append("Expected: " + (f"extraction {e['extract_gpu_hours']:.1f} GPU hours ({e['rule']}; {e['source']})"
                                 if "extract_gpu_hours" in e else e["note"]))
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
        lines.append(f"| fine-tuning runs and checkpoints | {_gb(d['finetune_merged'])} | {_gb(d['finetune_adapters'])} |")
        lines.append(f"| **total (= peak)** | **{_gb(d['total_merged'])}** | **{_gb(d['total_adapters'])}** |")
        lines.append(f"Assumptions: {d['assumptions']}.")
    return "\n".join(lines)


def _gb(b: float) -> str:
    return f"{b / GB:,.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:,.0f} MB"


