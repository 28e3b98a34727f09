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


ROOT = Path(__file__).resolve().parents[1]


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_unwritable_outputs_and_folders_are_named_with_the_fix(tmp_path, small_fs):
    """The two checks before any job: the folders the jobs to run would write into (outputs in folders
    still to be made under a writable one pass), and, when the workflow is read, every folder and
    write-protected file under the results folder."""
    from llmscape.io import unwritable_outputs, unwritable_under

    writable = tmp_path / "ok"
    (writable / "a").mkdir(parents=True)
    (writable / "a" / "kept.json").write_text("{}")
    assert unwritable_outputs([writable / "a" / "b" / "x.parquet", writable / "y.json"]) is None
    assert unwritable_under(writable) is None and unwritable_under(tmp_path / "absent") is None
    results = small_fs("64k")
    (results / "data").mkdir()
    (results / "data" / "summary.json").write_text("{}")
    remount_read_only(results.parent)
    note = unwritable_outputs([results / "data" / "summary.json", results / "reps" / "m" / "0shot.h5",
                               writable / "y.json"])
    assert note == (f"Nothing was run: the jobs to run write into folders that cannot be written: {results} (a "
                    f"read-only file system); {results / 'data'} (a read-only file system). Fix: make them writable "
                    f"(`chmod -R u+w {results}, {results / 'data'}`, or remount the file system read-write), or run "
                    "the workflow from a writable copy of the checkout.")
    warned = unwritable_under(results)  # the top folder only: all below it is blocked too
    assert warned.startswith(f"{results} holds folders that cannot be written: {results} (a read-only file "
                             "system). A job that must write there fails"), warned
    assert f"Fix: if they are to be rebuilt, make them writable (`chmod -R u+w {results}`" in warned


def snakemake_ci(work: Path, *args: str) -> str:
    """The real workflow on the CI config in ``work``; its output (it has failed)."""
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
                        "--configfile", str(ROOT / "config" / "ci.yaml"), "--config",
                        f"resources_dir={ROOT / 'resources'}", "--cores", "1", *args], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    return out


@pytest.mark.slow  # builds the CI DAG twice (about a minute on 2 busy cores)
def test_a_read_only_results_folder_is_named_before_any_job(tmp_path, small_fs):
    """The real workflow on the CI config with its results folder on a file system that turned read-only.
    Outputs still to be made: the run stops after the DAG is built and before any job, naming the folder
    and the fix. An output to be rebuilt: Snakemake stops while building the DAG with its
    ProtectedOutputException, and the warning printed before it names the folder, why and the fix."""
    for case in ("missing", "to_rebuild"):
        work = tmp_path / case
        work.mkdir()
        results = small_fs("64k")
        (work / "results").symlink_to(results)
        if case == "to_rebuild":
            (results / "data").mkdir()
            (results / "data" / "summary.json").write_text('{"before": true}')
        remount_read_only(results.parent)
        out = snakemake_ci(work, "--forcerun", "prepare_data", "results/data/summary.json")
        warning = "Warning: results holds folders that cannot be written: results (a read-only file system)"
        assert warning in out and "Fix: if they are to be rebuilt, make them writable" in out, out[-3000:]
        assert out.index(warning) < out.index("Building DAG of jobs"), out[-3000:]
        if case == "missing":
            assert "Nothing was run: the jobs to run write into folders that cannot be written: results (a " \
                   "read-only file system). Fix: make them writable" in out, out[-3000:]
            assert "rule prepare_data:" not in out, out[-3000:]  # no job started
        else:
            assert "ProtectedOutputException" in out and "results/data/summary.json" in out, out[-3000:]
            assert (results / "data" / "summary.json").read_text() == '{"before": true}'
        assert "Traceback" not in out, out[-3000:]
        assert not list((work / ".snakemake" / "locks").glob("*"))  # the stop released the lock


def test_every_writer_of_the_pipeline_names_a_full_disk(tmp_path, small_fs):
    """The writers the rules use (parquet, JSON, .npy, .npz, safetensors), each on a real full tmpfs:
    one line naming the folder, nothing left under the final name. (numpy's own .npy writer reports a
    short write without its errno, and safetensors its errno only in its text.)"""
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from llmscape.geometry.files import write_knn
    from llmscape.io import OutputError, atomic_path, write_json, write_npy, write_parquet

    def safetensors(dest, tensors):
        with atomic_path(dest) as tmp:
            save_file(tensors, str(tmp))

    big = np.random.default_rng(0).random(200_000)  # 1.6 MB into 64 kB
    writers = [(write_parquet, pd.DataFrame(dict(x=big))), (write_json, big.tolist()), (write_npy, big),
               (write_knn, dict(knn=big)), (safetensors, {"w": torch.from_numpy(big)})]
    for writer, value in writers:
        results = small_fs("64k")
        dest = results / "out.bin"
        with pytest.raises(OutputError) as e:
            writer(dest, value)
        assert str(e.value) == (f"cannot write {dest}: No space left on device in {results}. Fix: free space there "
                                f"(`df -h {results}` shows what is left) or run the workflow where there is room; "
                                "then rerun (an extraction resumes its .partial file)."), writer
        assert list(results.iterdir()) == [], writer
