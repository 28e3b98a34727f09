"""What every benchmark shares: alternating runs, the machine's load around each, median and spread.

A benchmark on a shared machine is only as good as its worst neighbour. So every method is run
``repeats`` times, alternating with the others (a slow spell hits all of them), and each run records the
1-minute load average (``os.getloadavg``) before it and the highest value sampled every second while it
ran, and the CPU that *other* processes used while it ran: the machine's busy CPU time (``/proc/stat``)
minus the benchmark's own (this process and its finished children), in cores. A run is **busy** when
other processes used more than ``BUSY_OTHER_CORES`` cores on average: something else was computing, and
its absolute times say little (the ratio of alternated methods says more). The load average alone
cannot tell: back-to-back runs of a 2-thread benchmark keep it near 2 on a machine doing nothing else.
Where ``/proc/stat`` is missing, the load average decides (above ``BUSY_PER_CORE`` x the cores). Summaries
give the median, the minimum and maximum, the spread ((max - min) / median) and how many runs were busy.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import threading
import time
from collections.abc import Callable

import numpy as np

BUSY_PER_CORE = 0.5  # load average per core above which a run is marked busy (without /proc/stat)
BUSY_OTHER_CORES = 0.5  # other processes' average CPU use, in cores, above which a run is marked busy


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy(load: float) -> bool:
    return load > BUSY_PER_CORE * cores()


def _machine_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq, steal) since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadSampler:
    """The 1-minute load average before a run, its maximum sampled every ``every`` seconds during it, and
    the CPU other processes used meanwhile (in cores)."""

    def __init__(self, every: float = 1.0):
        self.every, self.before, self.peak = every, os.getloadavg()[0], os.getloadavg()[0]
        self.other_cores: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._t0, self._machine0, self._own0 = time.perf_counter(), _machine_cpu_s(), _own_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, os.getloadavg()[0])
        machine, wall = _machine_cpu_s(), time.perf_counter() - self._t0
        if machine is not None and self._machine0 is not None and wall > 0:
            other = (machine - self._machine0) - (_own_cpu_s() - self._own0)
            self.other_cores = max(0.0, other / wall)

    def record(self) -> dict:
        if self.other_cores is None:
            is_busy = busy(self.before) or busy(self.peak)
        else:
            is_busy = self.other_cores > BUSY_OTHER_CORES
        return dict(load_before=round(self.before, 2), load_during_max=round(self.peak, 2),
                    other_cores=None if self.other_cores is None else round(self.other_cores, 2), busy=is_busy)


def timed(fn: Callable[[], dict | None]) -> dict:
    """Run ``fn`` once: its own result (a dict, or nothing) plus wall seconds and the load record."""
    with LoadSampler() as load:
        t0 = time.perf_counter()
        out = fn() or {}
        seconds = time.perf_counter() - t0
    return dict(dict(seconds=seconds), **out, **load.record())


def alternate(methods: dict[str, Callable[[], dict | None]], repeats: int = 3) -> dict[str, list[dict]]:
    """``repeats`` rounds, each running every method once in turn; per method the list of its runs."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            run = timed(fn)
            runs[name].append(run)
            print(f"  round {r + 1}/{repeats} {name}: {run['seconds']:.2f} s, load {run['load_before']:.2f} -> "
                  f"max {run['load_during_max']:.2f}{' BUSY' if run['busy'] else ''}", flush=True)
    return runs


def summary(runs: list[dict], key: str = "seconds") -> dict:
    """Median, min, max and spread of ``key`` over runs, and how many of them were busy."""
    x = np.array([r[key] for r in runs], dtype=float)
    med = float(np.median(x))
    spread = float((x.max() - x.min()) / med) if med else 0.0
    return dict(median=med, min=float(x.min()), max=float(x.max()), spread=spread, n=len(x),
                n_busy=int(sum(r.get("busy", False) for r in runs)))


def ratio(runs_a: list[dict], runs_b: list[dict], key: str = "seconds") -> dict:
    """a / b per round (runs of one round were alternated, so they shared the machine's state), summarised."""
    per = [dict(r=a[key] / b[key], busy=a.get("busy", False) or b.get("busy", False))
           for a, b in zip(runs_a, runs_b, strict=True)]
    return dict(summary(per, "r"), per_round=[round(p["r"], 3) for p in per])


def machine() -> dict:
    """Where and when: UTC date, cores, CPU model, platform, load averages at the start."""
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return dict(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), cores=cores(),
                cpu=cpu, platform=platform.platform(), load_at_start=[round(x, 2) for x in os.getloadavg()],
                busy_rule=f"a run is busy when the 1-minute load average before it or during it exceeds "
                          f"{BUSY_PER_CORE} x {cores()} cores", kernels=kernel_sets())


def kernel_sets() -> dict:
    """Which kernels the numerical libraries run here, since they set much of a benchmark's speed:
    OpenBLAS's (numpy's and scipy's BLAS: the CPU type it detected, or the one ``OPENBLAS_CORETYPE``
    holds it to) and torch's (its CPU capability, which oneDNN follows unless ``ONEDNN_MAX_CPU_ISA``
    caps it)."""
    out = {v: os.environ[v] for v in ("OPENBLAS_CORETYPE", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if v in os.environ}
    try:
        import numpy  # noqa: F401  (loads OpenBLAS, so that threadpoolctl sees it)
        from threadpoolctl import threadpool_info

        libs = threadpool_info()
        out["openblas"] = sorted({str(i.get("architecture")) for i in libs if i.get("internal_api") == "openblas"})
    except ImportError:
        pass
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return out


def fmt(s: dict, unit: str = "s") -> str:
    busy_note = f", {s['n_busy']}/{s['n']} busy" if s["n_busy"] else ""
    return (f"{s['median']:.2f} {unit} (min {s['min']:.2f}, max {s['max']:.2f}, "
            f"spread {100 * s['spread']:.0f}%{busy_note})")
