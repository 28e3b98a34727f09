"""Habits the code keeps, checked: ruff (configured in pyproject.toml; scripts/ruff.toml adds what Snakemake's
``script:`` directive implies) finds nothing in src/, scripts/, bench/ and tests/; every ``# noqa`` names
its codes and says why on the same line; and no file edits ``sys.path`` (the package is installed, bench
scripts run as ``python3 bench/x.py``, tests get src/ from pytest's ``pythonpath`` option and children of
tests from tests/checkout.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = ["src", "scripts", "bench", "tests"]
#: a suppression with its reason: the marker, its codes (E402, F401...), then words saying why
JUSTIFIED_NOQA = re.compile(r"#\s*noqa:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*\s+\S")
NOQA = re.compile(r"#\s*noqa\b", re.I)
SYS_PATH_EDIT = re.compile(r"\bsys\.path\s*(?:\.(?:insert|append|extend)\s*\(|\[[^\]]*\]\s*=|\+?=)")


def ruff_command() -> list[str] | None:
    """ruff as installed with the dev extra: its executable, else ``python -m ruff``; None without it."""
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    return [sys.executable, "-m", "ruff"] if importlib.util.find_spec("ruff") else None


def tracked_files(*patterns: str) -> list[Path]:
    """Files of the checkout that git tracks or would track (untracked but not ignored), by pattern."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def test_ruff_finds_nothing():
    cmd = ruff_command()
    if cmd is None:
        pytest.skip("ruff is not installed (it comes with the dev extra: pip install -e .[dev])")
    res = subprocess.run([*cmd, "check", "--no-cache", "--output-format", "concise", *LINTED], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_every_noqa_names_its_codes_and_says_why():
    bare = []
    for f in tracked_files("*.py", "*.sh", "*.sbatch", "*.smk", "Snakefile"):
        if f.name == "test_lint.py":  # its examples below
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if NOQA.search(line) and not JUSTIFIED_NOQA.search(line):
                bare.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bare, "a `# noqa` without its codes or its reason:\n" + "\n".join(bare)


def test_no_file_edits_sys_path():
    edits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
             for f in tracked_files("*.py", "*.sh", "*.sbatch", "*.smk", "Snakefile") if f.name != "test_lint.py"
             for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if SYS_PATH_EDIT.search(line)]
    assert not edits, "sys.path edited (install the package, or set PYTHONPATH for a child):\n" + "\n".join(edits)


@pytest.mark.parametrize("line, justified", [
    ("import x  # noqa: F401  re-exported for callers", True),
    ("import x  # noqa: F401,E402  two codes, one reason", True),
    ("import x  # noqa: F401", False),
    ("import x  # noqa", False),
    ("import x  # NOQA: F401 (why)", False),
])
def test_the_noqa_rule_itself(line, justified):
    """The pattern the repository is held to: codes, then a reason (a bare or code-only noqa fails)."""
    assert bool(NOQA.search(line)) and bool(JUSTIFIED_NOQA.search(line)) == justified


@pytest.mark.parametrize("line, edit", [
    ('sys.path.insert(0, str(ROOT / "src"))', True),
    ("sys.path[:] = [p for p in sys.path if 'site' not in p]", True),
    ("sys.path.append('bench')", True),
    ("sys.path += ['x']", True),
    ("print(sys.path)", False),
    ("paths = [p for p in sys.path if p]", False),
])
def test_the_sys_path_rule_itself(line, edit):
    assert bool(SYS_PATH_EDIT.search(line)) == edit
