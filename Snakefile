# llmscape: how LLMs represent what they read, and how that relates to their weights.
# This file is the table of contents; the stages live in workflow/rules/, the code in src/llmscape/.
#
#   snakemake --cores 2                                   embedded default (CPU, offline)
#   snakemake --profile profiles/slurm --configfile config/llama3-8b.yaml    a Slurm cluster
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless config files are given on the command line: a cluster config then
# stands alone (with the schema's defaults), instead of inheriting the laptop-sized settings.
# It is read with llmscape's reader first, which names the line and column of a YAML error (Snakemake's
# own reader says only "not valid JSON or YAML"); config files given on the command line are read by
# Snakemake before this file (scripts/submit.sbatch and make plan read them the same way first).
if not workflow.overwrite_configfiles:
    try:
        from llmscape.configcheck import read_config_file
    except ImportError:  # workflow/rules/common.smk says how to install it
        pass
    else:
        read_config_file("config/config.yaml")
    workflow.configfile("config/config.yaml")


report: "workflow/report/workflow.rst"


# Software per rule: each rule names its stage's conda environment (envs/, for --sdm conda); with
# --sdm apptainer every rule runs in this image instead (the Containerfile builds it, docs/install.md).
container: config.get("container", "llmscape.sif")


include: "workflow/rules/common.smk"  # config validation, resources, target lists
include: "workflow/rules/prepare.smk"  # model and MMLU preparation
include: "workflow/rules/extract.smk"  # per-layer last-token representations (HDF5)
include: "workflow/rules/spectra.smk"  # weight spectra, adaptive LoRA ranks, stable-rank interventions
include: "workflow/rules/geometry.smk"  # ID, density peaks, ARIs, overlaps per layer
include: "workflow/rules/join.smk"  # spectra x geometry: joined table, correlations, figures
include: "workflow/rules/finetune.smk"  # PEFT sweeps -> merged model variants


rule all:
    default_target: True
    input:
        get_final_output(),
