# The two commands of the README, plus helpers. PY=python3.11 make ... picks another interpreter.
PY ?= python3
CORES ?= 2
CONFIG ?= config/config.yaml
.PHONY: setup run test report bench plan cluster-dryrun

setup:            ## install the pinned stack into the current Python (idempotent)
	bash scripts/setup.sh

run: setup        ## the main job on the embedded default: the whole DAG, then the HTML report
	$(PY) -m snakemake --cores $(CORES)
	$(PY) -m snakemake --cores 1 --report report.html

test: setup       ## the whole test suite (starts a loopback Slurm cluster when run as root)
	$(PY) -m pytest

plan: setup       ## what CONFIG costs before it is submitted: jobs, GPU/CPU hours, disk (make plan CONFIG=...)
	$(PY) scripts/plan.py $(CONFIG)

report:           ## rebuild report.html from existing results
	$(PY) -m snakemake --cores 1 --report report.html

bench: setup      ## the speed/memory benchmarks (ratios against the published way, same run)
	$(PY) bench/bench_extract.py
