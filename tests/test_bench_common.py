"""bench/common.py's busy mark: CPU used by other processes while a run is timed counts against it; the
benchmark's own work (its threads, the children it waits for) does not."""

import subprocess
import sys
import time

import pytest

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_other_processes_cpu_marks_a_run_busy_and_its_own_does_not(script_module):
    common = script_module("bench/common.py", "bench_common")
    with common.LoadSampler() as own:  # the benchmark's own child, waited for inside the run: not "other"
        subprocess.run([sys.executable, "-c", BURN], check=True)
    with common.LoadSampler() as foreign:  # a process of another parent (the shell exits at once) burns a core
        subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 &', BURN], check=True)
        time.sleep(2.5)
    assert own.other_cores is not None and foreign.other_cores is not None
    # the foreign burner used about 1.5 CPU seconds of the run's 2.5 s; the own burner's 1.5 s are left out
    assert foreign.other_cores - own.other_cores > 0.4
    assert foreign.record()["busy"] is (foreign.other_cores > common.BUSY_OTHER_CORES)
