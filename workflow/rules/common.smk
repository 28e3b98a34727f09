# Shared by every stage: config validation, paths, resources, target lists.
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the llmscape library, without installing it

from llmscape.models import model_label

validate(config, schema="../schemas/config.schema.yaml", set_default=True)

MODEL = model_label(config["model"], config.get("model_label"))
SHOTS = [int(k) for k in config["extract"]["shots"]]
RES_DIR = config["resources_dir"]


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    variant=r"[A-Za-z0-9][A-Za-z0-9._=-]*",
    shots=r"\d+",


# Conservative defaults per rule group; config `resources:` overrides them. Memory and runtime grow
# with the attempt number, so a job killed for time or memory is retried with more (--retries).
DEFAULT_RESOURCES = {
    "default": dict(mem_mb=4000, runtime=60, cpus_per_task=1),
}


def res(group):
    """Resources of a rule group: config first, defaults second; mem_mb and runtime scale with attempt."""
    r = dict(DEFAULT_RESOURCES["default"])
    r.update(config["resources"].get("default", {}))
    r.update(DEFAULT_RESOURCES.get(group, {}))
    r.update(config["resources"].get(group, {}))
    mem, runtime = int(r.pop("mem_mb")), int(r.pop("runtime"))
    r["mem_mb"] = lambda wildcards, attempt: mem * attempt
    r["runtime"] = lambda wildcards, attempt: runtime * attempt
    if not r.get("gpu") or r.get("gres"):  # gres replaces gpu/gpu_model (the plugin refuses both)
        r.pop("gpu", None)
        r.pop("gpu_model", None)
    return r


# Downloads (the model, MMLU) need the login node's network, so they run in the head process; so do
# plots and the report when their stages add them here. Everything else is a cluster job.
localrules:
    prepare_model,
    prepare_data,


def threads_of(group):
    return int(res(group).get("cpus_per_task", 1))


def base_variants():
    return ["base"]


def extraction_targets():
    return expand(
        "results/reps/{model}/{variant}/{shots}shot.h5",
        model=MODEL,
        variant=base_variants(),
        shots=SHOTS,
    )


def get_final_output():
    return extraction_targets()
