"""Installing anywhere: the per-stage environments, the container recipe, the set-up script, the
Snakemake style checks, and the Slurm test cluster's reasons for not starting."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import envcheck as ec

ROOT = ec.ROOT
STAGES = sorted(ec.STAGE_MODULES)


def test_every_rule_runs_in_its_stage_environment_and_the_lint_is_clean():
    envs = ec.rule_environments()
    text = "\n".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    rules = re.findall(r"^\s*rule (\w+):", text, re.M) + re.findall(r"^\s*use rule \w+ as (\w+)", text, re.M)
    runs = [r for r in rules if r not in ("finetune_all", "join_all")]  # those two only gather targets
    assert set(envs) == set(runs)
    assert {Path(e).stem for e in envs.values()} == set(STAGES)
    assert all((ROOT / e).exists() for e in envs.values())
    res = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert "Congratulations, your workflow is in a good condition" in res.stdout + res.stderr, res.stdout[-3000:]


def test_workflow_files_are_snakefmt_clean():
    snakefmt = shutil.which("snakefmt") or str(Path(sys.executable).parent / "snakefmt")
    assert Path(snakefmt).exists(), "snakefmt is missing: make setup installs it (the dev extra)"
    res = subprocess.run([snakefmt, "--check", "Snakefile", "workflow/"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_environment_pins_equal_the_constraints(stage):
    pins, env = ec.constraints(), ec.read_env(ROOT / "envs" / f"{stage}.yaml")
    assert "python =3.11" in env["conda"] and "conda-forge" in env["channels"]
    assert env["pins"] and all(pins.get(name) == version for name, version in env["pins"].items()), \
        {n: (v, pins.get(n)) for n, v in env["pins"].items() if pins.get(n) != v}
    assert "-c ../constraints.txt" in env["options"]  # the rest of the closure, pinned the same way
    assert f"-e ..[{stage}]" in env["options"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert stage in extras and stage in extras["all"][0]


def test_pyproject_pins_equal_the_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]
    pins = ec.constraints()
    exact = [re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", r) for r in reqs]
    bad = {m.group(1): (m.group(2), pins.get(ec.norm(m.group(1)))) for m in exact
           if m and pins.get(ec.norm(m.group(1))) != m.group(2)}
    assert not bad


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_with_only_its_environment(stage, tmp_path):
    """Everything this machine has beyond the environment's closure is hidden from a Python that then
    imports the stage's modules: they must import."""
    res = ec.imports_within(stage, ROOT / "envs" / f"{stage}.yaml", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_a_missing_package_is_seen_by_the_environment_check(tmp_path):
    """The check above can fail: the geometry environment without dadapy and without its extra."""
    text = (ROOT / "envs" / "geometry.yaml").read_text()
    text = re.sub(r"\n\s+- dadapy==.*", "", text).replace("-e ..[geometry]", "-e ..[join]")
    env = tmp_path / "geometry.yaml"
    env.write_text(text)
    res = ec.imports_within("geometry", env, tmp_path)
    assert res.returncode != 0 and "dadapy" in res.stderr


def test_container_recipe_installs_the_set_up_pins():
    recipe = (ROOT / "Containerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"^ARG BASE=\S*python:3\.11", recipe, re.M) and re.search(r"^FROM \$\{BASE\}$", recipe, re.M)
    torch = re.search(r"torch==[\d.]+", setup).group(0)
    assert torch in recipe and torch == f"torch=={ec.constraints()['torch']}"
    install = re.search(r'pip install [^\n]*-c constraints\.txt "\.\[([\w,]+)\]"', recipe)
    setup_extras = set(re.search(r'-c constraints\.txt -e "\.\[([\w,]+)\]"', setup).group(1).split(","))
    assert install and set(install.group(1).split(",")) == setup_extras - {"dev", "bench"}
    assert re.search(r"^COPY pyproject\.toml constraints\.txt", recipe, re.M)
    snakefile = (ROOT / "Snakefile").read_text()
    assert re.search(r"^container: ", snakefile, re.M)


def test_setup_uses_the_python_that_make_is_given(tmp_path):
    res = subprocess.run(["make", "setup", f"PY={tmp_path}/python3.11"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert f"no Python named '{tmp_path}/python3.11'" in res.stderr


def test_setup_refuses_a_python_older_than_3_11(tmp_path):
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\n"
                   "case \"$*\" in *platform*) echo 3.9.18;; *version_info*) exit 1;; esac\n")
    old.chmod(0o755)
    res = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PY=str(old)))
    assert res.returncode == 2 and "Python 3.9.18; llmscape needs >= 3.11" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the start script's package step runs as root only")
def test_slurm_start_without_a_mirror_says_why(tmp_path):
    """No network to a Debian mirror (a stand-in apt-get that fails as it would offline): the start script
    exits 3 with one line naming the packages and the fix, which the test fixture turns into a skip
    (or, in CI, a failure) saying so."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "dpkg-query").write_text("#!/bin/sh\necho 'unknown'\n")
    (bin_ / "apt-get").write_text("#!/bin/sh\necho 'Temporary failure resolving deb.debian.org' >&2\nexit 100\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    had_policy = Path("/usr/sbin/policy-rc.d").exists()
    res = subprocess.run(["bash", str(ROOT / "scripts/start-slurm-test-cluster.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}",
                                  LLMSCAPE_SLURM_DIR=str(tmp_path / "state")))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "cannot install slurmctld slurmd slurm-client munge: apt-get failed" in res.stderr
    assert "Temporary failure resolving" in res.stderr
    assert Path("/usr/sbin/policy-rc.d").exists() == had_policy


@pytest.mark.slow
def test_container_install_resolves_to_the_constraints(tmp_path):
    """The recipe's install line, resolved by pip from the package index as the image build would
    (a dry run: nothing is installed): every package at the version of constraints.txt."""
    import json

    recipe = (ROOT / "Containerfile").read_text()
    extras = re.search(r'-c constraints\.txt "\.\[([\w,]+)\]"', recipe).group(1)
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                          "--report", str(report), "-c", "constraints.txt", f".[{extras}]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and re.search(r"NewConnectionError|Temporary failure|No matching distribution", res.stderr):
        pytest.skip(f"the package index cannot be reached: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-2000:]
    got = {ec.norm(i["metadata"]["name"]): i["metadata"]["version"].split("+")[0]
           for i in json.loads(report.read_text())["install"]}
    pins = ec.constraints()
    assert {n: (v, pins[n]) for n, v in got.items() if n in pins and pins[n] != v} == {}
    test_only = {"black", "iniconfig", "matplotlib-inline", "pathspec", "pluggy", "powerlaw", "pytest", "pytokens",
                 "ruff", "shfmt-py", "snakefmt", "weightwatcher"}  # the dev and bench extras, not in the image
    assert sorted(n for n in pins if n not in got) == sorted(test_only)


def test_every_rule_script_is_named_after_its_rule():
    text = "\n".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    # rules may sit inside an if (indented); a rule made by `use rule A as B` runs A's script
    pairs = re.findall(r"^[ \t]*rule (\w+):(?:\n[ \t]+.*|\n\s*\n(?=[ \t]+))*?"
                       r"\n[ \t]+script:\n\s+\"[./]*scripts/(\w+)\.py\"", text, re.M)
    derived = re.findall(r"^\s*use rule \w+ as (\w+)", text, re.M)
    assert {r for r, _ in pairs} | set(derived) == set(ec.rule_environments())  # (extract: one rule per mode)
    assert [r for r, s in pairs if r != s] == []
