"""This checkout as a Python started by a test sees it. pytest's ``pythonpath`` option (src/, tests/) reaches
the test process only; a child (a driver script, a training job) gets the checkout's src/ first on its
PYTHONPATH, so that it runs this checkout's llmscape whichever copy is installed."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with the checkout's src/ first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env
