"""Set-up mistakes fail before any job, naming the key or the file and the fix: an unknown device, a
fine-tuning split left empty by the analysis subset, a config file that is missing or does not parse
(with its line and column). The checks are called as the DAG build calls them, and once through a
real Snakemake dry run each; the job-side device check as the jobs call it."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from llmscape.configcheck import ConfigError, check_devices, check_finetune_split, read_config_file
from llmscape.devices import DeviceError, pick_device

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["config.yaml", "ci.yaml", "llama3-8b.yaml", "llama3-70b.yaml"]
CI_RUNS = ["lora-r4", "spectral-r-r4"]  # two sweeps of the CI config (names only count here)


def load(name: str) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    return cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass(name):
    cfg = load(name)
    check_devices(cfg)
    check_finetune_split(cfg["finetune"], cfg["data"], CI_RUNS)
    assert read_config_file(ROOT / "config" / name) == yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("key", ["extract.device", "spectra.device", "geometry.device"])
def test_an_unknown_device_is_named_at_dag_build_and_in_the_job(key):
    cfg = load("ci.yaml")
    section, name = key.split(".")
    cfg[section][name] = "gpu"
    with pytest.raises(ConfigError, match=f"{key} = 'gpu' is not a device.*Fix: set {key} to auto"):
        check_devices(cfg)
    with pytest.raises(DeviceError, match=f"{key} = 'gpu' is not a device"):
        pick_device("gpu", key=key)
    for fine in ("auto", "cpu", "cuda", "cuda:1"):
        cfg[section][name] = fine
        check_devices(cfg)


def test_an_empty_fine_tuning_split_is_named_with_the_key_that_emptied_it():
    cfg = load("ci.yaml")
    data = dict(cfg["data"], per_subject=2000, finetune_per_subject=None)
    with pytest.raises(ConfigError, match=r"finetune.data.split = 'finetune' is empty for the 2 fine-tuning run.*"
                                          r"data.per_subject = 2000.*Fix: data.per_subject below 305"):
        check_finetune_split(cfg["finetune"], data, CI_RUNS)
    with pytest.raises(ConfigError, match="data.finetune_per_subject = 0 keeps none"):
        check_finetune_split(cfg["finetune"], dict(cfg["data"], finetune_per_subject=0), CI_RUNS)
    check_finetune_split(cfg["finetune"], data, [])  # no fine-tuning runs: nothing to train
    # high_school_biology keeps 310 - 5 (pool) - 304 (analysis) = 1 question for training
    check_finetune_split(cfg["finetune"], dict(data, per_subject=304), CI_RUNS)


def test_a_missing_config_file_is_named_with_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'nope.yaml'} does not exist.*config/ci.yaml"):
        read_config_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, line, column, what", [
    ("model: m\ndata:\n  per_subject: 24\n   pool_size: 5\n", 4, 13, "mapping values are not allowed here"),
    ("data:\n\tper_subject: 3\n", 2, 1, "never tabs"),
    ("extract:\n  shots: [0, 2\nmodel: m\n", 3, 6, "expected ',' or ']'"),
])
def test_a_config_that_does_not_parse_is_named_with_line_and_column(tmp_path, text, line, column, what):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_config_file(path)
    assert str(e.value).startswith(f"{path}, line {line}, column {column}: not valid YAML") and what in str(e.value)
    r = subprocess.run([sys.executable, "-m", "llmscape.configcheck", str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and f"{path}, line {line}, column {column}" in r.stderr


def test_a_config_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="holds a list, not keys and values"):
        read_config_file(path)


def dry_run(tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(path)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("change, said", [
    (("extract", "device", "gpu"), "extract.device = 'gpu' is not a device"),
    (("data", "per_subject", 2000), "finetune.data.split = 'finetune' is empty"),
])
def test_the_dag_build_stops_before_any_job(tmp_path, change, said):
    cfg = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    section, key, value = change
    cfg[section] = dict(copy.deepcopy(cfg[section]), **{key: value})
    r = dry_run(tmp_path, cfg)
    out = r.stdout + r.stderr  # Snakemake prints the error on stdout
    assert r.returncode != 0 and said in out, out[-3000:]
    assert "Job stats" not in out


@pytest.mark.parametrize("args, said", [
    (["--configfile", "{missing}"], "config file {missing} does not exist"),
    (["--profile", "p", "--configfiles", "{ok}", "{bad}", "--cores", "1"], "{bad}, line 4, column 13: not valid YAML"),
    (["--configfile={bad}"], "{bad}, line 4, column 13: not valid YAML"),
])
def test_the_head_job_script_names_a_bad_config_file_before_submitting(tmp_path, args, said):
    """scripts/submit.sbatch, the cluster route, reads every --configfile as the workflow would before
    it submits anything (Snakemake itself would print a traceback for a missing file, or 'not valid
    JSON or YAML' without a line): the file, line and column, and exit status 2."""
    files = dict(missing=tmp_path / "nope.yaml", ok=tmp_path / "ok.yaml", bad=tmp_path / "bad.yaml")
    files["ok"].write_text("model: m\n")
    files["bad"].write_text("model: m\ndata:\n  per_subject: 24\n   pool_size: 5\n")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run(["bash", str(ROOT / "scripts" / "submit.sbatch"), *(a.format(**files) for a in args)],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2 and said.format(**files) in r.stderr, r.stderr
    assert "Fix:" in r.stderr and not (tmp_path / "logs").exists()  # nothing submitted


def test_an_embedded_default_config_that_does_not_parse_is_named_with_line_and_column(tmp_path):
    """`make run` and a plain `snakemake` read config/config.yaml from the Snakefile, through llmscape's
    reader: a YAML error is named with the file, line and column before Snakemake's own reader sees it."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("model: m\ndata:\n  per_subject: 24\n   pool_size: 5\n")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                        str(tmp_path), "-n"], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "config/config.yaml, line 4, column 13: not valid YAML: mapping values are not allowed here" in out, \
        out[-3000:]
    assert "not valid JSON or YAML" not in out
