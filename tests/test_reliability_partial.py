"""Two extraction jobs for one output never destroy each other's work: a job owns its partial file
(llmscape.owner), a second job waits for a live owner or stops naming it, and a dead owner's partial
file is resumed with its finished rows kept. The jobs are real extractions of the real SmolLM2-135M in
separate processes; the first one stops itself (SIGSTOP) after three batches, so the second one
starts while it holds the file, as an orphan job of a killed Snakemake head would."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from llmscape import extract as E, owner

DRIVER = r"""
import json, logging, os, pathlib, signal, sys
import torch
from llmscape import data, extract as E, models
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
rows, pool = data.load_prepared({data!r})
card = json.loads(pathlib.Path({card!r}).read_text())
tok, model = models.load(card["path"], dtype="float32", device="cpu")
pause_at, calls = int(os.environ.get("PAUSE_AT_FORWARD", "0")), [0]

def pause(module, args, kwargs):  # the test's way to hold a job still while it owns the file
    calls[0] += 1
    if calls[0] == pause_at:
        pathlib.Path({marker!r}).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)

E.decoder_parts(model)[0].register_forward_pre_hook(pause, with_kwargs=True)
acc = E.extract(card, rows, pool, E.ExtractConfig(**{cfg!r}), {out!r}, {acc_json!r}, model=model, tok=tok)
print("RESULT " + json.dumps(acc, sort_keys=True))
"""
CFG = dict(shots=2, token_budget=4096, max_batch=2, prefix_sharing=False, dtype="float32", device="cpu")
N_QUESTIONS = 18  # small_data: 3 subjects x 6; 9 batches of 2 without prefix sharing
PAUSE_AT = 4  # the 4th forward pass: 3 batches (6 rows) written and flushed


class Jobs:
    """Extraction jobs of one output, each a separate Python process."""

    def __init__(self, tmp_path: Path, card: dict, small_data: Path):
        self.tmp = tmp_path
        (tmp_path / "card.json").write_text(json.dumps(card))
        self.out, self.acc = tmp_path / "x.h5", tmp_path / "x.json"
        self.partial = tmp_path / "x.h5.partial"
        self.marker = tmp_path / "paused"
        self.procs: list[subprocess.Popen] = []
        self.code = DRIVER.format(data=str(small_data), card=str(tmp_path / "card.json"), marker=str(self.marker),
                                  cfg=CFG, out=str(self.out), acc_json=str(self.acc))

    def start(self, name: str, **env) -> subprocess.Popen:
        full = dict(os.environ, LLMSCAPE_HEARTBEAT_S="1", **{k: str(v) for k, v in env.items()})
        log = open(self.tmp / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, "-c", self.code], stdout=log, stderr=subprocess.STDOUT,
                                           text=True, env=full))
        return self.procs[-1]

    def close(self) -> None:
        """Kill what is still running (a failed test leaves no stopped process behind)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def start_paused(self, name: str) -> subprocess.Popen:
        """A job that stops itself while it owns the partial file (its state 'T', stopped)."""
        proc = self.start(name, PAUSE_AT_FORWARD=PAUSE_AT)
        wait_for(lambda: _state(proc.pid) == "T" or proc.poll() is not None, f"{name} to stop itself")
        assert proc.poll() is None, self.log(name)
        return proc


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def wait_for(cond, what: str, limit: float = 600) -> None:
    """Poll ``cond`` (a guard against a hang, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def done_rows(partial: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(partial, "r", locking=False) as f:
        done = f["done"][:]
        return done, f["hidden"][:, done]


def result(log: str) -> dict:
    return json.loads([line for line in log.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.fixture
def jobs(tmp_path, base_card, small_data):
    j = Jobs(tmp_path, base_card, small_data)
    yield j
    j.close()


@pytest.mark.slow
def test_a_second_job_stops_or_waits_naming_the_live_owner_which_finishes_intact(jobs):
    first = jobs.start_paused("first")
    stopped = jobs.start("stop", LLMSCAPE_OWNER_WAIT_S=0)
    assert stopped.wait() != 0
    said = jobs.log("stop")
    assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in said, said[-3000:]
    assert f"kill {first.pid}" in said and "OwnerBusyError" in said
    done, _ = done_rows(jobs.partial)  # the owner's rows are untouched
    assert done.sum() == 2 * (PAUSE_AT - 1)

    waiting = jobs.start("wait")
    wait_for(lambda: "waiting for it to end" in jobs.log("wait") or waiting.poll() is not None, "the wait message")
    assert waiting.poll() is None and f"pid {first.pid}" in jobs.log("wait"), jobs.log("wait")[-3000:]
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait() == 0, jobs.log("first")[-3000:]
    assert waiting.wait() == 0, jobs.log("wait")[-3000:]

    assert "was finished by the job this one waited for" in jobs.log("wait")
    assert result(jobs.log("wait")) == result(jobs.log("first")) == json.loads(jobs.acc.read_text())
    states = E.read_states(jobs.out)  # every chunk passes its fletcher32 checksum
    assert states["attrs"]["complete"] and states["hidden"].shape[1] == N_QUESTIONS
    assert np.isfinite(states["hidden"]).all()
    assert not jobs.partial.exists() and not owner.record_path(jobs.partial).exists()


@pytest.mark.slow
def test_a_killed_owners_partial_file_is_resumed_with_its_rows_kept(jobs):
    first = jobs.start_paused("first")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    record = json.loads(owner.record_path(jobs.partial).read_text())
    assert record["pid"] == first.pid
    done, kept = done_rows(jobs.partial)
    assert done.sum() == 2 * (PAUSE_AT - 1)

    rerun = jobs.start("rerun")
    assert rerun.wait() == 0, jobs.log("rerun")[-3000:]
    said = jobs.log("rerun")
    assert f"its owner, pid {first.pid} on host {socket.gethostname()}" in said and "no longer runs" in said
    assert f"{done.sum()} of {N_QUESTIONS} questions already done" in said
    states = E.read_states(jobs.out)
    np.testing.assert_array_equal(states["hidden"][:, done], kept)  # the dead job's rows, not recomputed
    with h5py.File(jobs.out, "r") as f:  # only the rest was run: whole prompts, no prefix sharing
        assert result(said)["new_tokens"] == int(f["n_tokens"][:][~done].sum())
    assert not jobs.partial.exists() and not owner.record_path(jobs.partial).exists()


def _record(partial: Path, **fields) -> Path:
    rec = dict(dict(host=socket.gethostname(), pid=1, proc_start=None, job=None, claimed="then"), **fields)
    path = owner.record_path(partial)
    path.write_text(json.dumps(rec))
    return path


def test_an_owner_on_another_host_is_live_while_its_heartbeat_is_fresh(tmp_path):
    partial = tmp_path / "x.h5.partial"
    record = _record(partial, host="node-elsewhere", pid=4242)
    with pytest.raises(owner.OwnerBusyError, match="being written by pid 4242 on host node-elsewhere.*kill 4242"):
        owner.claim(partial, wait_s=0)
    old = time.time() - 3600  # no heartbeat for an hour: the owner is gone
    os.utime(record, (old, old))
    claim = owner.claim(partial, wait_s=0)
    assert json.loads(record.read_text())["pid"] == os.getpid() and not claim.waited
    claim.release()
    assert not record.exists()


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path):
    partial = tmp_path / "x.h5.partial"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _record(partial, pid=other.pid, proc_start=owner._proc_start(other.pid), job="77")
        with pytest.raises(owner.OwnerBusyError, match=f"Slurm job 77 \\(host .*, pid {other.pid}\\).*scancel 77"):
            owner.claim(partial, wait_s=0)
        _record(partial, pid=other.pid, proc_start="1")  # the same pid, started at another time
        owner.claim(partial, wait_s=0).release()
    finally:
        other.kill()
        other.wait()



def test_a_slurm_job_stops_waiting_for_a_live_owner_after_a_bounded_time(tmp_path, monkeypatch):
    """A job in a Slurm allocation (GPUs held) does not wait for hours behind a live owner: with
    LLMSCAPE_OWNER_WAIT_S unset it waits SLURM_WAIT_S, then stops naming the owner and the fix; outside
    Slurm it waits until the owner ends; the variable overrides both."""
    monkeypatch.delenv(owner.WAIT_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert owner.default_wait_s() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    assert owner.default_wait_s() == owner.SLURM_WAIT_S == 600
    monkeypatch.setenv(owner.WAIT_ENV, "7")
    assert owner.default_wait_s() == 7
    monkeypatch.delenv(owner.WAIT_ENV)
    monkeypatch.setattr(owner, "SLURM_WAIT_S", 0.0)  # the bound, shortened: claim() must read it
    partial = tmp_path / "x.h5.partial"
    _record(partial, host="gpu-node-3", pid=4242)  # another host, its heartbeat fresh: live
    with pytest.raises(owner.OwnerBusyError) as e:
        owner.claim(partial)
    said = str(e.value)
    assert "being written by pid 4242 on host gpu-node-3" in said and "waited 0 s" in said, said
    assert "Fix: let that job finish" in said and "kill 4242 on gpu-node-3" in said, said
    assert json.loads(owner.record_path(partial).read_text())["pid"] == 4242  # the owner's record kept


@pytest.mark.slow
def test_an_orphan_of_a_killed_head_and_the_rerun_do_not_destroy_each_others_work(tmp_path):
    """The cluster case, on the local executor: the head is SIGKILLed while its extraction job holds
    the partial file (stopped, so that it still runs when the rerun starts); --unlock and
    --rerun-incomplete start a second job for the same output, which waits for the orphan naming it;
    the orphan finishes, and the rerun's job keeps its file instead of deleting it."""
    root = Path(__file__).resolve().parents[1]
    target = "results/reps/smollm2-135m/base/0shot.h5"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(root / "config" / "ci.yaml"), "--config", f"resources_dir={root / 'resources'}",
           "--cores", "1", target]
    partial = tmp_path / (target + ".partial")

    def logs() -> str:  # the jobs' logs (the orphan and the rerun's job write the same one)
        return "".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))

    head = subprocess.Popen(cmd, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    orphan = None
    try:
        wait_for(lambda: owner.record_path(partial).exists() and partial.exists() or head.poll() is not None,
                 "the extraction job to own its partial file")
        orphan = json.loads(owner.record_path(partial).read_text())["pid"]
        os.kill(orphan, signal.SIGSTOP)
        head.kill()  # the head dies; its job (a child of the job's own process) goes on
        head.wait()
        assert subprocess.run([*cmd, "--unlock"], capture_output=True).returncode == 0
        rerun = subprocess.Popen([*cmd, "--rerun-incomplete"], stdout=open(tmp_path / "rerun.log", "w"),
                                 stderr=subprocess.STDOUT)
        wait_for(lambda: "waiting for it to end" in logs() or rerun.poll() is not None, "the rerun to wait")
        assert f"is being written by pid {orphan} on host {socket.gethostname()}" in logs()
        os.kill(orphan, signal.SIGCONT)
        assert rerun.wait() == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        if orphan is not None and _state(orphan) is not None:
            os.kill(orphan, signal.SIGCONT)
        if head.poll() is None:
            head.kill()
    assert "was finished by the job this one waited for" in logs()
    states = E.read_states(tmp_path / target)
    assert states["attrs"]["complete"] and np.isfinite(states["hidden"]).all()
    assert not partial.exists() and not owner.record_path(partial).exists()
