"""A full disk or a read-only folder while a job writes: the job's log says so in one line naming the
folder and the fix (no traceback), and no output is left under its final name. The file systems are
real: small tmpfs mounts (mounting needs root; elsewhere these tests are skipped and say why), one
filled by a real extraction of the real SmolLM2-135M, one remounted read-only by the job itself while
it runs. The jobs run through Snakemake, with the rules' own entry-point kit (llmscape.rulekit)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNAKEFILE = """
rule probe:
    output: "{out}"
    log: "logs/probe.log"
    script: "probe.py"
"""
EXTRACT = """
import json, pathlib
import torch
from llmscape import data, extract as E, rulekit
log = rulekit.start(snakemake, "probe")
torch.set_num_threads(1)
rows, pool = data.load_prepared({data!r})
card = json.loads(pathlib.Path({card!r}).read_text())
cfg = E.ExtractConfig(shots=0, dtype="float32", device="cpu", max_batch=4, store_dtype="float32")
E.extract(card, rows, pool, cfg, snakemake.output[0])
"""
H5_WRITE = """
import subprocess
import h5py, numpy as np
from llmscape import rulekit
log = rulekit.start(snakemake, "probe")
# the file system turns read-only while the job runs (as one does after an error on a cluster)
subprocess.run(["mount", "-o", "remount,ro", {mount!r}], check=True)
with h5py.File(snakemake.output[0], "w") as f:
    f["x"] = np.zeros(1000)
"""


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of ``size``; unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); these tests need root")
        mounts.append(where)
        (where / "results").mkdir()
        return where / "results"

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", str(where)], check=False)


def run_job(tmp_path: Path, script: str, out: Path) -> tuple[int, str]:
    work = tmp_path / "work"
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE.format(out=out))
    (work / "probe.py").write_text(textwrap.dedent(script))
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-d", str(work), "-s",
                        str(work / "Snakefile")], capture_output=True, text=True)
    log = work / "logs" / "probe.log"
    return r.returncode, log.read_text() if log.exists() else r.stderr


def failure_line(log: str) -> str:
    """The log's one line saying why the job failed."""
    lines = [line for line in log.splitlines() if "rule probe failed" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_during_an_extraction_is_one_line_naming_the_folder(tmp_path, small_fs, base_card, small_data):
    results = small_fs("512k")  # the 18 questions' 31 layers need 1.3 MB
    (tmp_path / "card.json").write_text(json.dumps(base_card))
    script = EXTRACT.format(data=str(small_data), card=str(tmp_path / "card.json"))
    rc, log = run_job(tmp_path, script, results / "x.h5")
    assert rc != 0
    line = failure_line(log)
    assert f"rule probe failed: No space left on device in {results}. Fix: free space there" in line, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (results / "x.h5").exists()  # only the resumable .partial, never the final name


def test_a_read_only_folder_when_a_job_writes_is_one_line_naming_the_folder(tmp_path, small_fs):
    results = small_fs("64k")
    rc, log = run_job(tmp_path, H5_WRITE.format(mount=str(results.parent)), results / "x.h5")
    assert rc != 0
    line = failure_line(log)
    assert f"rule probe failed: Read-only file system: {results} cannot be written. Fix: make it writable" in line, \
        log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (results / "x.h5").exists()


def test_the_line_says_what_the_errno_means():
    """Each errno gets its own fix; a permission error may come from a read too, so it does not say
    'cannot be written'; an error of another kind is not taken for one (its traceback is kept)."""
    import errno

    from llmscape.io import no_room

    assert no_room(OSError(errno.EDQUOT, "quota", "/r/a.h5")).startswith("Disk quota exceeded in /r. Fix: free space")
    denied = no_room(PermissionError(errno.EACCES, "denied", "/r/a.h5"))
    assert denied.startswith("Permission denied in /r") and "cannot be written" not in denied
    assert no_room(ValueError("errno = 3 in some text")) is None
    assert no_room(FileNotFoundError(errno.ENOENT, "missing", "/r/a.h5")) is None
