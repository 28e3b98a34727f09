"""Slurm for real: profiles, the head-job wrapper, faults and the whole CI DAG on the loopback cluster.

Tests marked `slurm` use the session fixture `slurm_cluster` (tests/slurm_cluster.py), which starts
the project's single-node test cluster; without root/apt they are skipped with that reason (and
fail instead under LLMSCAPE_REQUIRE_SLURM=1, as in CI). The dry-run test needs neither Slurm nor a GPU.

Runtime on 2 cores: about 6-8 minutes, most of it Slurm's 1-minute time limit in the timeout fault
and the CPU extraction of the CI DAG (which runs locally while the fault workflow waits on Slurm).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from llmscape import cost
from llmscape.plan import parse_dryrun

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
CI_CONFIG = ROOT / "config" / "ci.yaml"
PROFILE_TEST = ROOT / "profiles" / "slurm-test"
PROFILE_REAL = ROOT / "profiles" / "slurm"
FAULT_SNAKEFILE = ROOT / "tests" / "slurm_fault" / "Snakefile"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


# ---------------------------------------------------------------------------------------- helpers
def snakemake(*args, cwd, env=None, timeout=600, nice=False) -> subprocess.CompletedProcess:
    cmd = [*(["nice", "-n", "10"] if nice else []), *SNAKEMAKE, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def workdir(path: Path) -> Path:
    """A working directory for the real workflow: config and resources come from the checkout."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config", "resources"):
        if not (path / name).exists():
            (path / name).symlink_to((ROOT / name).resolve())
    return path


def wait_until(pred, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def run_id(log_text: str) -> str | None:
    m = re.search(r"SLURM run ID: (\S+)", log_text)
    return m.group(1) if m else None


def jobs_of_run(name: str, rule: str, states: str = "R") -> list[str]:
    out = subprocess.run(["squeue", "-h", "--name", name, "-t", states, "-o", "%i|%k"],
                         capture_output=True, text=True).stdout
    return [line.split("|")[0] for line in out.split() if line.endswith(f"|rule_{rule}")]


def trace(wd: Path, rule: str) -> list[tuple[int, str, str]]:
    """(attempt, slurm job id, time limit) of every run of a rule in the fault workflow."""
    f = wd / "trace" / f"{rule}.txt"
    rows = [line.split() for line in f.read_text().splitlines()] if f.exists() else []
    return [(int(r[1]), r[2], r[3]) for r in rows]


# Keys, attributes and columns that may differ between two correct runs: timings and hosts, and the
# sha256 of written model files (safetensors writes its metadata header in hash-map order, so two
# processes write equal tensors with different bytes; the .safetensors files themselves are compared
# tensor by tensor below), with the extraction fingerprint derived from that sha256.
VOLATILE = re.compile(r"(time|seconds|elapsed|duration|wall|date|host|pid|checksum|fingerprint|per_s|memory)", re.I)


def _norm(obj, root: str):
    """Drop volatile keys; write the run's own working directory as <workdir>."""
    if isinstance(obj, dict):
        return {k: _norm(v, root) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [_norm(v, root) for v in obj]
    if isinstance(obj, bytes):
        obj = obj.decode("utf-8", "replace")
    if isinstance(obj, str):
        return obj.replace(root, "<workdir>")
    return obj


def assert_same_file(a: Path, b: Path, root_a: Path, root_b: Path):
    """Content equality by format: arrays, tensors and tables exactly; JSON and HDF5 attributes without
    volatile keys and with each run's working directory replaced by <workdir>."""
    import numpy as np

    ra, rb = str(root_a), str(root_b)

    def attr(v, root):
        return _norm(v.tolist() if isinstance(v, np.ndarray) else (v.item() if isinstance(v, np.generic) else v), root)

    suffix = a.suffix
    if suffix == ".h5":
        import h5py

        def walk(f):
            items = {}
            f.visititems(lambda name, obj: items.__setitem__(name, obj))
            return items

        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
            ia, ib = walk(fa), walk(fb)
            assert sorted(ia) == sorted(ib), f"{a.name}: different HDF5 layout"
            for name in ["/", *ia]:
                oa, ob = fa[name], fb[name]
                ka = sorted(k for k in oa.attrs if not VOLATILE.search(k))
                assert ka == sorted(k for k in ob.attrs if not VOLATILE.search(k)), f"{a}:{name} attrs"
                for k in ka:
                    assert attr(oa.attrs[k], ra) == attr(ob.attrs[k], rb), f"{a}:{name}@{k}"
                if isinstance(oa, h5py.Dataset):
                    assert oa.dtype == ob.dtype and oa.shape == ob.shape, f"{a}:{name}"
                    assert np.array_equal(oa[()], ob[()]), f"{a}:{name} differs"
    elif suffix == ".parquet":
        import pandas as pd

        fa, fb = pd.read_parquet(a), pd.read_parquet(b)
        fa, fb = (f.drop(columns=[c for c in f.columns if VOLATILE.search(str(c))]) for f in (fa, fb))
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(a, "np") as ta, safe_open(b, "np") as tb:
            assert ta.metadata() == tb.metadata(), a
            assert sorted(ta.keys()) == sorted(tb.keys()), a
            for k in ta.keys():
                assert np.array_equal(ta.get_tensor(k), tb.get_tensor(k)), f"{a}:{k}"
    elif suffix == ".npy":
        assert np.array_equal(np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)), a
    elif suffix == ".npz":
        with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
            assert sorted(za.files) == sorted(zb.files), a
            for k in za.files:
                assert np.array_equal(za[k], zb[k]), f"{a}:{k}"
    elif suffix == ".json":
        assert _norm(json.loads(a.read_text()), ra) == _norm(json.loads(b.read_text()), rb), a
    else:
        assert a.read_bytes().replace(ra.encode(), b"<workdir>") == \
            b.read_bytes().replace(rb.encode(), b"<workdir>"), f"{a} differs"


def script_missing_rules() -> list[str]:
    """Rules whose `script:` file does not exist yet (a stage that has not landed on this branch)."""
    missing = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        rule = None
        lines = smk.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"(?:rule|checkpoint) (\w+):", line)
            if m:
                rule = m.group(1)
            if line.strip() == "script:" and rule and i + 1 < len(lines):
                path = (smk.parent / lines[i + 1].strip().strip("\"',")).resolve()
                if not path.exists():
                    missing.append(rule)
    return missing


# ----------------------------------------------------- 6. the Llama-3-8B DAG without GPU or Slurm


def no_slurm_env(tmp_path: Path) -> dict:
    """PATH with python and basic tools but no Slurm commands: a laptop or CI runner without Slurm."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("which", "sh", "bash", "env", "uname", "cat", "ls", "git"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{bindir}",
               LLMSCAPE_SLURM_ACCOUNT="proj123", LLMSCAPE_SLURM_PARTITION="gpu-a100",
               HF_HUB_OFFLINE="1")  # the hub is not reachable here: fail fast instead of timing out
    env.pop("SNAKEMAKE_SLURM_PARTITIONS", None)
    return env


@pytest.mark.parametrize("config_name", ["llama3-8b.yaml", "llama3-70b.yaml"])  # 70B: several GPUs per job
def test_llama3_dryrun_without_gpu_or_slurm(tmp_path, config_name):
    env = no_slurm_env(tmp_path)
    for tool in ("sbatch", "squeue", "sinfo", "scontrol", "sacct"):
        assert shutil.which(tool, path=env["PATH"]) is None
    wd = workdir(tmp_path / "wd")
    t0 = time.monotonic()
    res = snakemake("-n", "--profile", PROFILE_REAL, "--configfile", ROOT / "config" / config_name,
                    "-s", SNAKEFILE, cwd=wd, env=env, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:]
    assert elapsed < 60, f"dry-run took {elapsed:.0f} s"
    jobs = parse_dryrun(res.stdout)
    cfg = yaml.safe_load((ROOT / "config" / config_name).read_text())

    # the whole DAG: every rule of the workflow, every shot
    listed = snakemake("--list-rules", "-s", SNAKEFILE, "--configfile", ROOT / "config" / config_name,
                       cwd=wd, env=env, timeout=120)
    rules = {line.strip() for line in listed.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}
    in_dag = {j["rule"] for j in jobs}
    assert rules and rules <= in_dag, f"rules missing from the DAG: {sorted(rules - in_dag)}"
    by_variant: dict[str, list[int]] = {}
    for j in jobs:
        if cost.is_extract(j["rule"]):
            by_variant.setdefault(j["wildcards"]["variant"], []).extend(cost.extract_job_shots(j))
    assert "base" in by_variant
    for variant, shots in by_variant.items():  # every model variant, every shot
        assert sorted(shots) == sorted(cfg["extract"]["shots"]), variant
    # one extraction job per variant over its shot counts: a few dozen GPU jobs, the weights read once each
    assert cfg["extract"]["one_job_per_variant"]
    assert sum(cost.is_extract(j["rule"]) for j in jobs) == len(by_variant)

    # the user's account and partition reach every job, and GPU jobs request exactly the config
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Res(dict):
        __getattr__ = dict.__getitem__

    def effective(group, r):  # finetune_<method> and extract_<k>shot inherit from their rule's group, as res() does
        parent = group.split("_")[0] if group.startswith(("finetune_", "extract_")) else None
        return {**cfg["resources"].get(parent, {}), **r} if parent else r

    groups_with_gpu = {g: effective(g, r) for g, r in cfg["resources"].items() if effective(g, r).get("gpu")}
    gpu_jobs = [j for j in jobs if j["resources"].get("gpu") or "gpu" in str(j["resources"].get("gres", ""))]
    assert {j["rule"] for j in gpu_jobs} >= {"extract"}
    for j in jobs:
        if j["rule"] != "all":
            assert j["resources"].get("slurm_account") == "proj123", j
            assert j["resources"].get("slurm_partition") == "gpu-a100", j
    for j in gpu_jobs:
        r = j["resources"]
        declared = {k: r.get(k) for k in ("mem_mb", "runtime", "cpus_per_task", "gpu", "gpu_model")}
        assert declared in [{k: g.get(k) for k in declared} for g in groups_with_gpu.values()], j
        if cost.is_extract(j["rule"]):  # a job over every shot count of a variant: resources.extract
            assert declared == {k: cfg["resources"]["extract"].get(k) for k in declared}
        job = SimpleNamespace(resources=Res(r), threads=r["cpus_per_task"], name=j["rule"])
        call = get_submit_command(job, {"run_uuid": "x", "slurm_logfile": "l", "comment_str": "c",
                                        "account": " -A proj123", "partition": " -p gpu-a100",
                                        "workdir": "/w"}) + set_gres_string(job)
        assert f"--gpus={r['gpu_model']}:{r['gpu']}" in call, call
        assert f"--mem {r['mem_mb']}" in call and f"-t {r['runtime']}" in call, call
        assert f"--cpus-per-task={r['cpus_per_task']}" in call, call
        assert "--ntasks-per-gpu" not in call, "would start the script once per GPU"
        assert " -A proj123" in call and " -p gpu-a100" in call


# ----------------------------------------------------------------- shared runs (module fixtures)
@pytest.fixture(scope="module")
def work_root():
    """Working directories of the cluster runs. Not pytest's tmp_path: pytest prunes old
    /tmp/pytest-of-<user>/pytest-N folders, and another session of the same user (a colleague's
    test run on a shared machine) could delete them under running Slurm jobs.
    LLMSCAPE_KEEP_SLURM_TMP=1 keeps them for inspection."""
    base = Path(tempfile.mkdtemp(prefix="llmscape-slurm-tests-"))
    yield base
    if os.environ.get("LLMSCAPE_KEEP_SLURM_TMP") != "1":
        shutil.rmtree(base, ignore_errors=True)


def fresh(base: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


@dataclass
class Run:
    wd: Path
    rc: int
    log: str
    seconds: float


@pytest.fixture(scope="module")
def local_reference(work_root):
    """The CI DAG run locally (the reference for the cluster run), started in the background so that
    it overlaps with the fault workflow, which mostly waits on Slurm."""
    wd = workdir(fresh(work_root, "local"))
    omit = script_missing_rules()
    args = [*SNAKEMAKE, "-s", SNAKEFILE, "--configfile", CI_CONFIG, "--cores", "2",
            *(["--omit-from", *omit] if omit else [])]
    logf = open(wd / "head.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(["nice", "-n", "10", *map(str, args)], cwd=wd, stdout=logf,
                            stderr=subprocess.STDOUT, text=True)

    def result() -> Run:
        rc = proc.wait(timeout=1200)
        logf.close()
        return Run(wd, rc, (wd / "head.log").read_text(), time.monotonic() - t0)

    yield result
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def fault_run(slurm_cluster, local_reference, work_root):
    """The fault workflow through profiles/slurm-test, with its `victim` job scancel'd mid-run."""
    wd = fresh(work_root, "fault")
    env = dict(os.environ, FAULT_SLOW_SECONDS="100", FAULT_VICTIM_SECONDS="120")
    logf = open(wd / "head.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([*SNAKEMAKE, "-s", str(FAULT_SNAKEFILE), "--profile", str(PROFILE_TEST),
                             "--slurm-array-jobs", "many"], cwd=wd, env=env, stdout=logf,
                            stderr=subprocess.STDOUT, text=True)
    try:
        name = wait_until(lambda: run_id((wd / "head.log").read_text()), 60, "the SLURM run ID")
        # mid-run: the job is RUNNING and has already written its partial output
        victim = wait_until(lambda: (wd / "out" / "victim.txt").exists() and jobs_of_run(name, "victim"),
                            180, "the victim job to run")[0]
        subprocess.run(["scancel", victim], check=True)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # snakemake cancels its own jobs on SIGINT
            proc.wait(timeout=60)
        logf.close()
        name = run_id((wd / "head.log").read_text())
        if name:
            subprocess.run(["scancel", "--name", name])  # nothing of this run may outlive it
    return dict(run=Run(wd, rc, (wd / "head.log").read_text(), time.monotonic() - t0), victim=victim)


# --------------------------------------------------------------------------------- 5. the faults
EXPECTED = {
    "out/source.txt": "source\n",
    "out/fail_once.txt": "fail_once\n",
    "out/slow_once.txt": "slow_once\n",
    "out/victim.txt": "victim\n",
    "out/join.txt": "many 0\nmany 1\nmany 2\nfail_once\nslow_once\nvictim\n",
    "out/summary.txt": "6\n",
}


@pytest.mark.slurm
def test_fault_dag_completes_without_corrupt_output(fault_run):
    run = fault_run["run"]
    assert run.rc == 0, run.log[-6000:]
    for rel, content in EXPECTED.items():
        assert (run.wd / rel).read_text() == content, rel
    assert not list((run.wd / "out").rglob("*.tmp")), "a temporary output was left behind"
    print(f"fault workflow: {run.seconds:.0f} s")


@pytest.mark.slurm
def test_job_failing_once_is_retried(fault_run):
    run = fault_run["run"]
    tries = trace(run.wd, "fail_once")
    assert [t[0] for t in tries] == [1, 2]
    assert f"SLURM-job '{tries[0][1]}' failed, SLURM status is: 'FAILED'" in run.log
    # attempt-scaled resources: the retry got twice the runtime (2 -> 4 minutes)
    assert [t[2] for t in tries] == ["2:00", "4:00"]


@pytest.mark.slurm
def test_cancelled_job_is_retried(fault_run):
    run = fault_run["run"]
    tries = trace(run.wd, "victim")
    assert [t[0] for t in tries] == [1, 2]
    assert tries[0][1] == fault_run["victim"]
    assert f"SLURM-job '{fault_run['victim']}' failed, SLURM status is: 'CANCELLED'" in run.log
    assert (run.wd / "out" / "victim.txt").read_text() == "victim\n"


@pytest.mark.slurm
def test_job_over_time_limit_is_resubmitted_with_more_time(fault_run):
    run = fault_run["run"]
    tries = trace(run.wd, "slow_once")
    assert [(t[0], t[2]) for t in tries] == [(1, "1:00"), (2, "2:00")]
    assert f"SLURM-job '{tries[0][1]}' failed, SLURM status is: 'TIMEOUT'" in run.log


@pytest.mark.slurm
def test_many_small_jobs_go_out_as_one_job_array(fault_run):
    run = fault_run["run"]
    assert "Submitted array job" in run.log
    logs = sorted(p.name for p in (run.wd / "logs" / "slurm" / "rule_many").glob("*.log"))
    assert len(logs) == 3 and len({n.split("_")[0] for n in logs}) == 1, logs
    assert {n.split("_")[1] for n in logs} == {"1.log", "2.log", "3.log"}


@pytest.mark.slurm
def test_forcerun_reruns_the_rule_and_its_dependents_only(fault_run):
    run = fault_run["run"]
    assert run.rc == 0
    wd = run.wd
    before = {r: len(trace(wd, r)) for r in ("source", "many", "fail_once", "slow_once", "victim", "join")}
    mtimes = {p: (wd / p).stat().st_mtime_ns for p in EXPECTED}
    res = snakemake("-s", FAULT_SNAKEFILE, "--profile", PROFILE_TEST, "--slurm-array-jobs", "many",
                    "--forcerun", "many", cwd=wd)
    assert res.returncode == 0, res.stdout[-4000:]
    after = {r: len(trace(wd, r)) for r in before}
    assert after == {**before, "many": before["many"] + 3, "join": before["join"] + 1}
    for p in ("out/source.txt", "out/fail_once.txt", "out/slow_once.txt", "out/victim.txt"):
        assert (wd / p).stat().st_mtime_ns == mtimes[p], f"{p} was rerun"
    for p in ("out/join.txt", "out/summary.txt"):
        assert (wd / p).stat().st_mtime_ns > mtimes[p], f"{p} was not rerun"
    for rel, content in EXPECTED.items():
        assert (wd / rel).read_text() == content


@pytest.mark.slurm
def test_head_killed_with_sigkill_is_recovered(slurm_cluster, work_root):
    wd = fresh(work_root, "sigkill")
    args = ["-s", FAULT_SNAKEFILE, "--profile", PROFILE_TEST, "out/victim.txt"]
    env = dict(os.environ, FAULT_VICTIM_SECONDS="120")
    logf = open(wd / "head.log", "w")
    proc = subprocess.Popen([*SNAKEMAKE, *map(str, args)], cwd=wd, env=env, stdout=logf,
                            stderr=subprocess.STDOUT, text=True)
    name = None
    try:
        name = wait_until(lambda: run_id((wd / "head.log").read_text()), 60, "the SLURM run ID")
        wait_until(lambda: (wd / "out" / "victim.txt").exists() and jobs_of_run(name, "victim"), 180,
                   "the victim job to run")
    finally:
        proc.send_signal(signal.SIGKILL)  # the head dies mid-run: lock and incomplete marker stay behind
        proc.wait(timeout=30)
        logf.close()
        if name is None:
            name = run_id((wd / "head.log").read_text())
        if name is None:
            pytest.fail("the head never logged its SLURM run ID")
    assert (wd / "out" / "victim.txt").read_text() == "partial\n"

    env = dict(os.environ, FAULT_VICTIM_SECONDS="0")
    try:
        # Snakemake refuses both a plain rerun (the killed job's output is marked incomplete) and a
        # rerun with --rerun-incomplete (the dead head's lock is still there) ...
        incomplete = snakemake(*args, cwd=wd, env=env)
        assert incomplete.returncode != 0 and "IncompleteFilesException" in incomplete.stdout, \
            incomplete.stdout[-3000:]
        locked = snakemake(*args, "--rerun-incomplete", cwd=wd, env=env)
        assert locked.returncode != 0 and "cannot be locked" in locked.stdout, locked.stdout[-3000:]
    finally:
        # ... and the dead head's jobs outlive it: cancel them by the run's job name (docs/slurm.md),
        # so that no orphan writes into the outputs of the recovery run
        subprocess.run(["scancel", "--name", name], check=True)
    wait_until(lambda: not jobs_of_run(name, "victim", "PD,R,CG"), 60, "the orphaned job to end")
    unlock = snakemake(*args, "--unlock", cwd=wd, env=env)
    assert unlock.returncode == 0, unlock.stdout[-3000:]
    rerun = snakemake(*args, "--rerun-incomplete", cwd=wd, env=env)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert (wd / "out" / "victim.txt").read_text() == "victim\n"
    assert [t[0] for t in trace(wd, "victim")] == [1, 1]  # the killed try, then the recovery run
    assert (wd / "out" / "source.txt").read_text() == "source\n"


# -------------------------------------------------------------------- 2. the head-job wrapper
@pytest.mark.slurm
def test_head_job_wrapper_runs_snakemake_in_a_slurm_job(slurm_cluster, work_root):
    tmp_path = fresh(work_root, "wrapper")
    env = dict(os.environ, LLMSCAPE_PROFILE=str(PROFILE_TEST))
    sub = subprocess.run([str(ROOT / "scripts" / "submit.sbatch"), "-s", str(FAULT_SNAKEFILE),
                          "out/source.txt"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    jobid = sub.stdout.strip().split(";")[0]
    state = slurm_cluster.wait_job(jobid, timeout=300)
    log = tmp_path / "logs" / "head" / f"llmscape-head-{jobid}.log"  # absolute, under the submit dir
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert f"in {tmp_path}" in text and "[head] snakemake-executor-plugin-slurm" in text
    assert (tmp_path / "out" / "source.txt").read_text() == "source\n"
    assert trace(tmp_path, "source")[0][1] != jobid  # the rule ran as its own Slurm job


# ----------------------------------------------- 4. the whole CI DAG on the cluster, as locally
@pytest.mark.slurm
def test_ci_dag_on_the_cluster_is_identical_to_a_local_run(slurm_cluster, local_reference, work_root):
    omit = script_missing_rules()
    wd = workdir(fresh(work_root, "cluster"))
    # on the cluster one extraction job per variant (as the Llama configs), locally one per shot count:
    # the files must not depend on how the extractions were cut into jobs
    (wd / "per_variant.yaml").write_text("extract: {one_job_per_variant: true}\n")
    t0 = time.monotonic()
    res = snakemake("-s", SNAKEFILE, "--configfile", CI_CONFIG, wd / "per_variant.yaml", "--profile", PROFILE_TEST,
                    *(["--omit-from", *omit] if omit else []), cwd=wd, timeout=1200)
    seconds = time.monotonic() - t0
    (wd / "head.log").write_text(res.stdout)
    assert res.returncode == 0, res.stdout[-6000:]
    local = local_reference()
    assert local.rc == 0, local.log[-6000:]

    # local jobs are printed as "localrule X:", cluster jobs only as submitted and finished
    ran_local = set(re.findall(r"^localrule (\w+):", res.stdout, re.M))
    ran_slurm = set(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", res.stdout, re.M)) - ran_local
    if not ran_slurm and omit:
        pytest.skip(f"no stage that runs on Slurm has landed yet (scripts missing for {omit})")
    assert ran_slurm, "nothing ran on Slurm"
    assert {"prepare_model", "prepare_data"} <= ran_local  # downloads stay on the head node
    extract_jobs = re.findall(r"^Finished jobid: \d+ \(Rule: (extract\w*)\)", res.stdout, re.M)
    variants = {p.parent.name for p in (wd / "results" / "reps").rglob("*shot.h5")}
    assert len(extract_jobs) == len(variants) < len(list((wd / "results" / "reps").rglob("*shot.h5")))
    slurm_logs = {p.name.removeprefix("rule_") for p in (wd / "logs" / "slurm").iterdir()}
    assert ran_slurm <= slurm_logs, "a cluster rule left no Slurm log"
    assert not (ran_local & slurm_logs)

    def result_files(root):
        # TensorBoard names its folders and event files after the time, host and pid of the writer:
        # compare that each run has its tb/ tree, not the names or bytes inside it
        out = set()
        for p in (root / "results").rglob("*"):
            if p.is_file():
                rel = p.relative_to(root)
                out.add(Path(*rel.parts[: rel.parts.index("tb") + 1]) if "tb" in rel.parts[:-1] else rel)
        return sorted(out)

    files_c, files_l = result_files(wd), result_files(local.wd)
    assert files_c == files_l
    files_c = [rel for rel in files_c if rel.name != "tb"]
    for rel in files_c:
        if rel.name == "config.html":  # the effective configuration: the cluster run's one extra key
            c, lo = ((r / rel).read_text().replace(str(r), "<workdir>") for r in (wd, local.wd))
            assert "one_job_per_variant: true" in c and "one_job_per_variant: false" in lo
            c = re.sub(r"<li>\s*<code><workdir>/per_variant\.yaml</code>\s*</li>\s*", "", c)
            assert c.replace("one_job_per_variant: true", "one_job_per_variant: false") == lo
            continue
        assert_same_file(local.wd / rel, wd / rel, local.wd, wd)
    print(f"CI DAG: cluster {seconds:.0f} s, local {local.seconds:.0f} s; on Slurm: {sorted(ran_slurm)};"
          f" omitted (not landed): {omit}")
