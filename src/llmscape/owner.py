"""Who writes a partial file: one job owns it, a second one for the same output waits or stops.

A job that writes ``<out>.partial`` first claims it in ``<out>.partial.owner``, a small JSON record:
its Slurm job id (if any), host, pid, the pid's start time (so a reused pid is not taken for the owner)
and when it claimed the file. While the job runs, a thread refreshes the record's modification time
(the heartbeat). Another job that finds the record asks whether the owner still runs:

* on the same host: is the pid alive, with the same start time (/proc/<pid>/stat);
* on another host: is its Slurm job still active (``squeue``, else ``sacct``), and where Slurm cannot
  say (no Slurm job, no Slurm commands), was the heartbeat refreshed within ``stale_after`` seconds.

A live owner is waited for (``LLMSCAPE_OWNER_WAIT_S`` seconds at most; unset: until it ends, except in a
Slurm job, which would hold its allocation, GPUs included, idle meanwhile: ``SLURM_WAIT_S`` there; 0 stops
at once) with a message naming it; a dead owner's record is taken over and its partial file resumed.
The record is read and written under an exclusive ``flock`` (released by the kernel when a process
dies), so two reruns that find the same dead owner cannot both take it over.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LlmscapeError

log = logging.getLogger("llmscape.owner")

SUFFIX = ".owner"
WAIT_ENV = "LLMSCAPE_OWNER_WAIT_S"
HEARTBEAT_ENV = "LLMSCAPE_HEARTBEAT_S"
#: the longest a Slurm job waits for a live owner when $LLMSCAPE_OWNER_WAIT_S is unset (it then stops,
#: naming the owner, rather than hold its allocation idle for the hours an extraction may take)
SLURM_WAIT_S = 600.0
#: Slurm job states in which the job may still be writing
ACTIVE_STATES = {"RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "STAGE_OUT", "SIGNALING", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED"}


class OwnerBusyError(LlmscapeError, RuntimeError):
    """Another job, still running, writes the same partial file."""


def heartbeat_s() -> float:
    return float(os.environ.get(HEARTBEAT_ENV, "30"))


def default_wait_s() -> float | None:
    """How long a job waits for a live owner: $LLMSCAPE_OWNER_WAIT_S seconds; unset, ``SLURM_WAIT_S`` in a
    Slurm job ($SLURM_JOB_ID set) and until the owner ends elsewhere (None)."""
    value = os.environ.get(WAIT_ENV, "")
    if value != "":
        return float(value)
    return SLURM_WAIT_S if os.environ.get("SLURM_JOB_ID") else None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat), or None."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    proc_start: str | None
    job: str | None
    claimed: str

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _proc_start(pid), os.environ.get("SLURM_JOB_ID"),
                   time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    def describe(self) -> str:
        who = f"Slurm job {self.job} (host {self.host}, pid {self.pid})" if self.job else \
            f"pid {self.pid} on host {self.host}"
        return f"{who}, which claimed it at {self.claimed}"

    def how_to_stop(self) -> str:
        return f"scancel {self.job}" if self.job else f"kill {self.pid} on {self.host}"

    def same_process(self, other: Owner) -> bool:
        return (self.host, self.pid, self.proc_start) == (other.host, other.pid, other.proc_start)


def slurm_state(job: str) -> str | None:
    """The job's state per squeue (queued or running jobs), else sacct (ended ones); 'GONE' when squeue
    does not know the job and sacct has no record of it; None when no Slurm command answers."""
    queue = _run(["squeue", "-h", "-j", job, "-o", "%T"])
    if queue is not None and queue[0] == 0 and queue[1]:
        return queue[1][0].upper()
    acct = _run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"])
    if acct is not None and acct[0] == 0 and acct[1]:
        return acct[1][0].upper()
    if queue is not None and (queue[0] == 0 or "Invalid job id" in queue[2]):
        return "GONE"
    return None


def _run(cmd: list[str]) -> tuple[int, list[str], str] | None:
    """(exit status, words of stdout, stderr) of a Slurm command, None when it cannot run."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.returncode, r.stdout.split(), r.stderr


def alive(rec: Owner, record: Path, stale_after: float | None = None) -> bool:
    """Whether the owner ``rec`` (read from ``record``) may still be writing."""
    if rec.host == socket.gethostname():
        return _pid_alive(rec.pid, rec.proc_start)
    if rec.job:
        state = slurm_state(rec.job)
        if state is not None:
            return state.rstrip("+") in ACTIVE_STATES
    stale_after = 4 * heartbeat_s() if stale_after is None else stale_after
    return time.time() - record.stat().st_mtime < stale_after


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    """A process of this host that runs (a zombie does not) and started when the record says (else
    the pid was reused by another process after the owner ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: the pid alone says it
    return fields[0] != "Z" and (proc_start is None or fields[19] == proc_start)


def record_path(partial: Path) -> Path:
    return partial.with_name(partial.name + SUFFIX)


@contextlib.contextmanager
def _locked(path: Path):
    """The record file, open and under an exclusive flock (reopened when the file was replaced or
    removed while this process waited for the lock). Where the file system has no flock (some network
    file systems), the record is used without it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("%s: no file lock on this file system (%s); the owner record is used without it", path, e)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _read(fd: int) -> Owner | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        return Owner(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # empty (just created) or not a record: no owner


def _write(fd: int, rec: Owner) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(rec), indent=1) + "\n").encode())
    os.fsync(fd)


def claim(partial: str | os.PathLike, wait_s: float | None = None) -> Claim:
    """Make this process the owner of ``partial`` (a file it is about to resume or begin). A live owner
    is waited for, ``wait_s`` seconds at most (default: :func:`default_wait_s`), then
    :class:`OwnerBusyError` names it; a dead owner is taken over (its partial file stays)."""
    partial = Path(partial)
    record, me = record_path(partial), Owner.me()
    wait_s = default_wait_s() if wait_s is None else wait_s
    started, told, waited = time.monotonic(), None, False
    while True:
        with _locked(record) as fd:
            rec = _read(fd)
            if rec is None or rec.same_process(me) or not alive(rec, record):
                if rec is not None and not rec.same_process(me):
                    log.warning("%s: its owner, %s, no longer runs; this job takes the file over", partial,
                                rec.describe())
                _write(fd, me)
                return Claim(partial, record, me, waited)
        busy = f"{partial} is being written by {rec.describe()}"
        if wait_s is not None and time.monotonic() - started >= wait_s:
            raise OwnerBusyError(
                f"{busy}; this job waited {wait_s:.0f} s for it ({WAIT_ENV} sets how long) and stops, as two "
                f"jobs must not write one file. Fix: let that job finish, then rerun (its output then stands), "
                f"or stop it ({rec.how_to_stop()}) and rerun, which resumes its partial file.")
        if told is None or time.monotonic() - told > 600:
            limit = "" if wait_s is None else f", {wait_s:.0f} s at most"
            log.warning("%s; waiting for it to end%s (%s=0 stops at once instead)", busy, limit, WAIT_ENV)
            told = time.monotonic()
        waited = True
        time.sleep(min(5.0, heartbeat_s()))


class Claim:
    """This process's ownership of a partial file. :meth:`watch` starts the heartbeat, which also
    gives the claim up once the partial file is gone (renamed to the output); so does the end of the
    process, or :meth:`release`."""

    def __init__(self, partial: Path, record: Path, me: Owner, waited: bool):
        self.partial, self.record, self.me, self.waited = partial, record, me, waited
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.release)

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"owner {self.partial.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(1.0):
            if not self.partial.exists():
                self.release()
                return
            if time.monotonic() - last >= heartbeat_s():
                with contextlib.suppress(OSError):
                    os.utime(self.record)
                last = time.monotonic()

    def release(self) -> None:
        """Remove the record if it is still this process's (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        with contextlib.suppress(OSError), _locked(self.record) as fd:
            rec = _read(fd)
            if rec is None or rec.same_process(self.me):
                os.unlink(self.record)
