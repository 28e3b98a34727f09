"""What every benchmark shares: alternating runs, the machine's load around each, median and spread.

A benchmark on a shared machine is only as good as its worst neighbour. So every method is run
``repeats`` times, alternating with the others (a slow spell hits all of them), and each run records the
1-minute load average (``os.getloadavg``) before it and the highest value sampled every second while it
ran. A run is **busy** when either exceeds ``BUSY_PER_CORE`` x the machine's cores: something else was
computing, and its absolute times say little (the ratio of alternated methods says more). Summaries give
the median, the minimum and maximum, the spread ((max - min) / median) and how many runs were busy.
"""
from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from collections.abc import Callable

import numpy as np

BUSY_PER_CORE = 0.5  # load average per core above which a run is marked busy


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy(load: float) -> bool:
    return load > BUSY_PER_CORE * cores()


class LoadSampler:
    """The 1-minute load average before a run and its maximum sampled every ``every`` seconds during it."""

    def __init__(self, every: float = 1.0):
        self.every, self.before, self.peak = every, os.getloadavg()[0], os.getloadavg()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, os.getloadavg()[0])

    def record(self) -> dict:
        return dict(load_before=round(self.before, 2), load_during_max=round(self.peak, 2),
                    busy=busy(self.before) or busy(self.peak))


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
                          f"{BUSY_PER_CORE} x {cores()} cores")


def fmt(s: dict, unit: str = "s") -> str:
    busy_note = f", {s['n_busy']}/{s['n']} busy" if s["n_busy"] else ""
    return (f"{s['median']:.2f} {unit} (min {s['min']:.2f}, max {s['max']:.2f}, "
            f"spread {100 * s['spread']:.0f}%{busy_note})")
