# Functions and settings of the finetune rules (workflow/rules/finetune.smk): targets, inputs, checks.
import re
from dataclasses import asdict

from snakemake.exceptions import WorkflowError

from llmscape.finetune import grid as ft_grid
from llmscape.finetune import registry as ft_registry
from llmscape.finetune.common import FinetuneError
from llmscape.finetune.launch import METHOD_INPUT
from llmscape.finetune.train import checkpoint_steps

FT = config["finetune"]
FT_DATA_DIR = FT["data"]["dir"]
try:
    FT_RUNS = ft_grid.expand(FT) if FT["enabled"] else {}
except FinetuneError as e:
    raise WorkflowError(f"finetune config: {e}") from None
FT_TRAIN = FT["train"]  # the schema has filled in every default (the only place they are written)
FT_CKPT_STEPS = checkpoint_steps(FT_TRAIN["max_steps"], FT_TRAIN["n_checkpoints"]) if FT["checkpoint_spectra"] else []
FT_RUN_RE = "|".join(re.escape(r) for r in FT_RUNS) or "(?!)"
_FT_CHECKED = []


def _ft_model_shapes():
    """Linear shapes of the configured model from a config.json on this machine (models.local_config_dir:
    never a request to the hub); None when there is none yet: the job then checks at its start."""
    from llmscape.finetune.common import meta_shapes

    src = local_config_dir(config["model"], RES_DIR, KNOWN_CONFIGS)
    if src is None:
        print(
            "finetune: no config.json of the model on this machine yet; rank checks run at job start", file=sys.stderr
        )
        return None
    return meta_shapes(src, config["trust_remote_code"])


def finetune_check():
    """Grid checks that need the model's shapes and the other stages' rules (a method's input file that a
    rule makes need not exist yet); once per workflow."""
    if _FT_CHECKED or not FT_RUNS:
        return

    def producible(path):
        return any(r.is_producer(path) for r in workflow.rules)

    try:
        ft_grid.validate(FT_RUNS, _ft_model_shapes(), lambda run: ft_registry.context(run, MODEL, FT), producible)
    except FinetuneError as e:
        raise WorkflowError(f"finetune config: {e}") from None
    _ft_check_launch()
    _FT_CHECKED.append(True)


FT_LAUNCH = FT["launch"]


def _ft_check_launch():
    """Several processes per run need as many GPUs where GPUs are requested (else the job could never
    start them); checked for every method group before any job is submitted."""
    n = int(FT_LAUNCH["num_processes"])
    for run, spec in FT_RUNS.items():
        method = ft_registry.get(spec.method)
        why = method.launch_constraint(spec) if method.launch_constraint is not None else None
        if why and (n > 1 or FT_TRAIN["deepspeed"]):
            raise WorkflowError(f"run {run}: {spec.method}: {why}")
        gpus = res(_ft_method_group(run), parent="finetune").get("gpu", 0)
        gpufit.check_zero3_launch(FT_TRAIN, FT_LAUNCH, int(gpus or 0), _ft_method_group(run), [Path(workflow.basedir)])
        if isinstance(gpus, int) and 0 < gpus < n:
            raise WorkflowError(
                f"finetune.launch.num_processes is {n} but run {run} requests {gpus} GPU(s) "
                f"(resources.{_ft_method_group(run)}.gpu or resources.finetune.gpu). Fix: request "
                f"{n} GPUs or set finetune.launch.num_processes to {gpus}."
            )


def _ft_method_group(run):
    method = FT_RUNS[run].method.replace("-", "_")
    return f"finetune_{method}"


def _ft_resource(key):
    """Per-method resources: resources.finetune_<method> over resources.finetune over the defaults."""

    def get(wildcards, attempt):
        v = res(_ft_method_group(wildcards.run), parent="finetune")[key]
        return v(wildcards, attempt) if callable(v) else v

    return get


def finetune_resources():
    r = res("finetune")
    out = {k: v for k, v in r.items() if k in ("gpu", "gpu_model")}
    for key in ("mem_mb", "runtime", "cpus_per_task"):
        out[key] = _ft_resource(key)
    return out


def finetune_variants():
    """Model variants made by the sweep (one per run), for extraction, geometry and spectra targets."""
    return list(FT_RUNS)


def checkpoint_variants():
    """Variants of the log-spaced checkpoints: `{run}-step{N}` (cards like any variant)."""
    return [f"{r}-step{s}" for r in FT_RUNS for s in FT_CKPT_STEPS]


def checkpoint_dirs():
    """Weight folders of the checkpoints (adapters or merged copies), for the spectra during training."""
    return [f"results/finetune/{MODEL}/{r}/checkpoints/step_{s}" for r in FT_RUNS for s in FT_CKPT_STEPS]


def finetune_targets():
    finetune_check()
    if not FT_RUNS:
        return []
    out = expand("results/finetune/{model}/{run}/metrics.json", model=MODEL, run=FT_RUNS)
    out += expand(
        "results/models/{model}/{variant}/model.json", model=MODEL, variant=finetune_variants() + checkpoint_variants()
    )
    return out


def finetune_inputs(wildcards):
    run = FT_RUNS[wildcards.run]
    d = FT_DATA_DIR
    inp = dict(
        card=f"results/models/{wildcards.model}/base/model.json",
        table=f"{d}/mmlu.parquet",
        pool=f"{d}/pool.parquet",
        train_index=f"{d}/{FT['data']['split']}_index.npy",
        eval_index=f"{d}/{FT['data']['eval_split']}_index.npy",
    )
    # the files the method declared, as method_<name> (the job passes them on under <name>)
    declared = ft_registry.get(run.method).input_files(run, wildcards.model, FT)
    inp.update({METHOD_INPUT + k: v for k, v in declared.items()})
    return inp
