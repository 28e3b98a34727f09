# The two commands of the README, plus helpers. PY=python3.11 make ... picks another interpreter; with an
# externally managed Python (PEP 668) scripts/setup.sh makes .venv, which every target then uses.
PY ?= python3
RUN = $$(test -x .venv/bin/python && echo .venv/bin/python || echo $(PY))
CORES ?= 2
CONFIG ?= config/config.yaml
.PHONY: setup run test report bench plan cluster-dryrun image image-test

setup:            ## install the pinned stack into the current Python (idempotent)
	PY=$(PY) bash scripts/setup.sh

run: setup        ## the main job on the embedded default: the whole DAG, then the HTML report
	$(RUN) -m snakemake --cores $(CORES)
	$(RUN) -m snakemake --cores 1 --report report.html

test: setup       ## the whole test suite (starts a loopback Slurm cluster when run as root)
	$(RUN) -m pytest

plan: setup       ## what CONFIG costs before it is submitted: jobs, GPU/CPU hours, disk (make plan CONFIG=...)
	$(RUN) scripts/plan.py $(CONFIG)

report:           ## rebuild report.html from existing results
	$(RUN) -m snakemake --cores 1 --report report.html

bench: setup      ## every benchmark, methods alternated 3 times (median, spread, load; bench/common.py) -> bench/results/
	$(RUN) bench/bench_extract.py
	$(RUN) bench/bench_spectra.py
	$(RUN) bench/bench_geometry.py
	$(RUN) bench/bench_intervals.py
	$(RUN) bench/bench_finetune.py --threads $(CORES) --steps 3
	$(RUN) bench/readme_table.py

image:            ## the container image, podman (docs/install.md): make image [IMAGE_BASE=debootstrap] [PIP_CERT=ca.pem]
	bash scripts/image-build.sh

image-test: setup ## build the image from HEAD, run the CI DAG with it and locally, compare the results (14-26 min on 2 busy cores, docs/install.md)
	PY="$(RUN)" bash scripts/image-test.sh
