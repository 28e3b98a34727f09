"""Pytest plugin: the loopback Slurm test cluster as a session-scoped fixture.

`slurm_cluster` starts the single-node cluster with the project's own
scripts/start-slurm-test-cluster.sh (which apt-gets slurmctld, slurmd, slurm-client and munge where
they are missing) and, at the end of the session, stops it with scripts/stop-slurm-test-cluster.sh,
but only if this session started it: a cluster that was already up (CI's setup step, a developer's
shell) is left running.

Where the cluster cannot be had (not root, no apt-get and no Slurm installed) the tests that use it
are skipped with a reason saying so. With LLMSCAPE_REQUIRE_SLURM=1 (set by CI) they fail instead,
so that CI can never pass them by skipping. A start that is possible but fails is always an error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "start-slurm-test-cluster.sh"
STOP = ROOT / "scripts" / "stop-slurm-test-cluster.sh"
STATE = Path(os.environ.get("LLMSCAPE_SLURM_DIR", "/tmp/llmscape-slurm"))
PIDS = {"slurmctld": "slurmctld", "slurmd": "slurmd"}


@dataclass
class SlurmCluster:
    state_dir: Path
    partition: str = "debug"
    started_here: bool = False

    def squeue(self, *args: str) -> str:
        return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True).stdout

    def job_state(self, jobid: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", str(jobid)], capture_output=True, text=True)
        for tok in out.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, jobid: str, timeout: float = 300) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.job_state(jobid)
            if st not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return st
            time.sleep(1)
        raise TimeoutError(f"Slurm job {jobid} still {self.job_state(jobid)} after {timeout} s")


def _alive(name: str) -> bool:
    pidfile = STATE / "run" / f"{name}.pid"
    try:
        pid = int(pidfile.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == PIDS[name]
    except (OSError, ValueError):
        return False


def _running() -> bool:
    if not all(_alive(n) for n in PIDS) or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "UP" in ping.stdout


def why_unavailable() -> str | None:
    """Why this machine cannot run the test cluster, or None if it can."""
    if _running():
        return None
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (apt-get, munged, slurmctld, slurmd); not root"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it (Debian/Ubuntu only)"
    if not have_slurm and shutil.which("dpkg-query") is None:
        return "no dpkg-query to check the Slurm packages"
    return None


def _unavailable(reason: str):
    if os.environ.get("LLMSCAPE_REQUIRE_SLURM") == "1":
        pytest.fail(f"LLMSCAPE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(f"Slurm test cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = why_unavailable()
    if reason:
        _unavailable(reason)
    if _running():
        yield SlurmCluster(STATE, started_here=False)
        return
    env = dict(os.environ, LLMSCAPE_SLURM_DIR=str(STATE))
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(START)], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode == 3:  # the script's "packages cannot be installed here" (no mirror reachable)
        _unavailable(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "apt-get failed")
    if res.returncode != 0:
        pytest.fail(f"{START.name} failed (rc {res.returncode}):\n{res.stdout}\n{res.stderr}", pytrace=False)
    print(f"\n[slurm_cluster] started in {time.monotonic() - t0:.1f} s\n{res.stdout}")
    try:
        yield SlurmCluster(STATE, started_here=True)
    finally:
        subprocess.run(["bash", str(STOP)], env=env, timeout=120)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the loopback Slurm test cluster (root + apt)")
