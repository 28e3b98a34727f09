"""The DAG end to end on the CI config, locally (the Slurm variant is in test_slurm.py), and the
configuration errors a researcher sees before anything runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

import envcheck as ec
from llmscape.rulekit import RECORD_IMPORTS

ROOT = Path(__file__).resolve().parents[1]


def smk(workdir: Path, *args: str, configfile: str = "config/ci.yaml", env: dict | None = None
        ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(ROOT / configfile) if not Path(configfile).is_absolute() else configfile,
           "--config", f"resources_dir={ROOT / 'resources'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("dag")
    # every job records the distributions it imported (checked against its rule's environment below)
    res = smk(wd, "--cores", "2", env={RECORD_IMPORTS: str(wd / "imports")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wd


@pytest.mark.slow
def test_ci_dag_runs_end_to_end(ci_run):
    reps = ci_run / "results" / "reps" / "smollm2-135m" / "base"
    for k in (0, 2):
        with h5py.File(reps / f"{k}shot.h5") as f:
            assert f["hidden"].shape == (31, 96, 576)
            assert f.attrs["shots"] == k
        assert (reps / f"{k}shot.json").exists()
        assert (ci_run / "logs" / "extract" / "smollm2-135m" / "base" / f"{k}shot.log").stat().st_size > 0
        assert (ci_run / "benchmarks" / "extract" / "smollm2-135m" / "base" / f"{k}shot.tsv").exists()
    assert not list(ci_run.rglob("*.partial")) and not list(ci_run.rglob(".*.tmp"))
    # the CI config trains each run as 2 processes through accelerate launch (finetune.launch)

    runs = sorted((ci_run / "results" / "finetune" / "smollm2-135m").glob("*/metrics.json"))
    assert len(runs) == 2 and all(json.loads(m.read_text())["world_size"] == 2 for m in runs)
    assert all("launching 2 processes" in log.read_text()
               for log in (ci_run / "logs" / "finetune" / "smollm2-135m").glob("*.log"))


@pytest.mark.slow
def test_every_job_imported_only_what_its_rule_environment_provides(ci_run):
    """With --sdm conda each rule runs in its stage's environment (envs/): what the CI DAG's jobs (and the
    fine-tuning workers) imported of the pinned stack must be installed there, apart from Snakemake's own
    script preamble and the optional imports that tests/test_install.py shows each stage can do without."""
    envs, pins, preamble = ec.rule_environments(), ec.constraints(), ec.preamble_distributions()
    imported = {}
    for f in (ci_run / "imports").glob("*.json"):
        rec = json.loads(f.read_text())
        imported.setdefault(rec["rule"], set()).update(rec["distributions"])
    # every rule that runs code ran and recorded, except extract_variants: the CI config extracts one job
    # per shot count (the Slurm test runs one job per variant, with extract's script and environment)
    assert set(imported) == set(envs) - {"extract_variants"}
    assert envs["extract_variants"] == envs["extract"]
    closures = {e: ec.env_closure(ROOT / e) for e in set(envs.values())}
    lacking = {rule: sorted(d for d in dists if d in pins and d not in closures[envs[rule]] | preamble)
               for rule, dists in imported.items()}
    assert {r: [d for d in ds if d not in ec.OPTIONAL_IMPORTS] for r, ds in lacking.items()} == {r: [] for r in lacking}
    assert {d for ds in lacking.values() for d in ds} <= ec.OPTIONAL_IMPORTS


@pytest.mark.slow
@pytest.mark.parametrize("change, rule", [
    ("spectra={plot_metrics: [alpha_ks]}", "plot_spectra"),  # not in what the spectra jobs read
    ("join={heatmap: {method: pearson}}", "plot_join"),  # not in what join_tables and correlate read
])
def test_a_key_read_by_one_rule_reruns_that_rule_only(ci_run, change, rule):
    """Each rule passes only the keys its job reads: a change elsewhere in a config section does not
    make the other rules of the stage rerun (params are a rerun trigger)."""
    res = smk(ci_run, change, "-n", "--rerun-triggers", "params")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = res.stdout.split("Job stats:")[1].split("\n\n")[0]
    jobs = {line.split()[0] for line in stats.splitlines()[3:] if line.strip() and line.split()[0] != "total"}
    # join_config renders the whole effective configuration into the report, so every change reruns it;
    # `all` is the target itself
    assert jobs == {rule, "join_config", "all"}, stats


@pytest.mark.slow
def test_report_of_the_ci_run_is_complete(ci_run):
    """snakemake --report: one self-contained HTML with the join's figures and tables, the configuration
    and the per-rule runtimes."""
    from llmscape.join.report import check_report

    report = ci_run / "report.html"
    res = smk(ci_run, "--cores", "1", "--report", str(report))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert check_report(report) == []
    text = report.read_text(errors="replace")
    assert "Geometry" in text and "spectra" in text.lower()
    # the front page names the model that ran and shows the headline figure (inlined, with its caption)
    front = text.split("workflow_desc")[1][:400_000] if "workflow_desc" in text else text
    assert "llmscape run on the embedded model" in front
    assert "smollm2-135m: adjusted Rand index between the density-peak clusters and the MMLU subjects" in front
    assert "data:image/png;base64," in front


@pytest.mark.slow
def test_second_run_has_nothing_to_do(ci_run):
    res = smk(ci_run, "-n", "--cores", "1")
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.parametrize("bad, message", [
    ("extract:\n  shot_order: random\n", "'random' is not one of"),
    ("extract:\n  shots: [0, 7]\n", "holds 5 per subject. Fix"),
    ("data:\n  per_subject: 0\n", "0 is less than the minimum"),
    ("modle: smollm2-135m\n", "Additional properties are not allowed ('modle'"),
    # the geometry's intervals and resolution study: the key, the value and the fix
    ("geometry:\n  n_boot: -1\n", "geometry.n_boot = -1: -1 is less than the minimum of 0. Fix: use a value >= 0"),
    ("geometry:\n  confidence: 1.5\n", "geometry.confidence = 1.5: 1.5 is greater than or equal to the maximum "
                                       "of 1. Fix: use a value < 1"),
    ("geometry:\n  boot_fraction: 0\n", "geometry.boot_fraction = 0: 0 is less than or equal to the minimum of 0"),
    ("geometry:\n  resolution_study: {sizes: [10, 30]}\n",  # 10 x 4 subjects: enough points for the scales
     "geometry.resolution_study.sizes = [10, 30] asks for [30] questions per subject, but the smallest subject of "
     "the analysis subset has 24 (data.per_subject = 24). Fix: sizes of at most 24, or raise data.per_subject."),
    ("geometry:\n  resolution_study: {shots: 5}\n", "geometry.resolution_study.shots = 5 is not extracted"),
    ("geometry:\n  n_boot: 1\n", "geometry.n_boot = 1: an interval is the spread of at least 2 subsamples"),
    ("geometry:\n  id_scale: 3\n", "geometry.id_scale = 3: Gride's scales are (n1, 2 n1) for n1 = 1, 2, 4, 8"),
    # a misspelt resources group, which the rules would ignore
    ("resources:\n  extarct: {mem_mb: 9000}\n", "resources.extarct = {'mem_mb': 9000}: no rule reads a resources "
                                                 "group of this name, so it would be ignored. Fix: did you mean"),
    # data and model: found before any job, with the fix
    ("data:\n  subjects: []\n", "data.subjects = []: an empty list selects no subject. Fix: null"),
    ("data:\n  subjects: [anatomyy, world_religions]\n", "'anatomyy' (did you mean 'anatomy'?)"),
    ("data:\n  source: csv\n  path: /nonexistent/mmlu\n", "data.path = '/nonexistent/mmlu': no such folder"),
    ("model: /nonexistent/x\n", "model = '/nonexistent/x' looks like a local folder, and /nonexistent/x does not"),
    # GPUs the job could not use
    ("extract:\n  device_map: auto\n", "extract.device_map = 'auto' shards the model over the job's GPUs, but "
                                       "resources.extract.gpu requests none"),
])
def test_invalid_config_fails_before_running(tmp_path, bad, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "config" / "ci.yaml").read_text() + bad)
    res = smk(tmp_path, "-n", "--cores", "1", configfile=str(cfg))
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]


@pytest.fixture()
def counting_hub():
    """A stand-in for the HF hub on loopback that answers every request with 503 and counts it (the real
    hub cannot be reached here; a request to this one is what a login node without network would retry)."""
    import http.server
    import threading

    hits: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _count(self):
            hits.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.end_headers()

        do_GET = do_HEAD = do_POST = _count

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


@pytest.mark.parametrize("config_name", ["llama3-8b.yaml", "llama3-70b.yaml"])
def test_dag_build_makes_no_request_to_the_hub(tmp_path, counting_hub, config_name):
    """Hub models are checked in their jobs; the DAG is built from what is on this machine (an empty HF
    cache here), so a login node without network builds it at once instead of retrying the hub."""
    url, hits = counting_hub
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    res = smk(tmp_path / "wd", "-n", "--cores", "1", configfile=f"config/{config_name}", env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "rule extract:" in res.stdout  # the whole DAG was built
    assert hits == []


@pytest.mark.parametrize("group, change, message", [
    ("extract", {"gpu": 4, "gpu_model": "a100"},
     "resources.extract asks for 4 x NVIDIA A100 40GB (gpu_model 'a100', 40 GB each): after 2.7 GB of keys/values "
     "at extract.token_budget = 8192, and 2.0 GB of activations, a 2 GB reserve and one 1.7 GB block per GPU, they "
     "leave 134.6 GB for 141.1 GB of weights. Fix: request resources.extract.gpu: 5"),
    ("finetune", {"gpu": 4},
     "finetune.train.deepspeed = 'config/deepspeed/zero3.json' is ZeRO-3 with finetune.launch.num_processes = 8, "
     "but resources.finetune_lora.gpu requests 4 GPU(s)"),
])
def test_70b_gpus_that_cannot_run_fail_at_dag_build(tmp_path, group, change, message):
    """The 70B config with too few or too small GPUs: the error comes from the DAG build, offline."""
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "llama3-70b.yaml").read_text())
    cfg["resources"][group].update(change)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(cfg))
    res = smk(tmp_path / "wd", "-n", "--cores", "1", configfile=str(f), env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
