"""The per-stage environments under envs/: what each one installs, and which rule runs in which.

Used by tests/test_install.py (the files against constraints.txt) and tests/test_workflow.py (every
job of the CI DAG imported only what its rule's environment provides)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[norm(name)] = version.strip()
    return pins


def read_env(path: Path) -> dict:
    """python and conda packages, pip pins {name: version}, pip options and the editable line."""
    spec = yaml.safe_load(path.read_text())
    conda, pip_lines = [], []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pip_lines += [str(x).split(" #")[0].strip() for x in dep["pip"]]
        else:
            conda.append(str(dep))
    pins = {norm(x.split("==")[0]): x.split("==")[1] for x in pip_lines if "==" in x and not x.startswith("-")}
    return dict(conda=conda, pins=pins, options=[x for x in pip_lines if x.startswith("-")],
                channels=spec.get("channels", []))


def rule_environments() -> dict[str, str]:
    """rule name -> environment file (relative to the repository), from the conda directives."""
    out = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        # rules may sit inside an if (indented) and a rule made by `use rule A as B` has A's environment
        for block in re.split(r"\n(?=[ \t]*rule \w+:)", text):
            m = re.match(r"\s*rule (\w+):", block)
            env = re.search(r"\n\s+conda:\n\s+\"([^\"]+)\"", block)
            if m and env:
                out[m.group(1)] = str((smk.parent / env.group(1)).resolve().relative_to(ROOT))
        for parent, child in re.findall(r"^\s*use rule (\w+) as (\w+)", text, re.M):
            out[child] = out[parent]
    return out


def _requires(dist: str, extras: set[str]) -> list[str]:
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for r in map(Requirement, reqs):
        env_ok = r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""}))
        if env_ok:
            out.append(r.name if not r.extras else f"{r.name}[{','.join(sorted(r.extras))}]")
    return out


def closure(names: list[str]) -> set[str]:
    """Distributions that installing `names` (with [extras]) brings in, from the installed metadata."""
    seen, todo = set(), list(names)
    while todo:
        item = todo.pop()
        name, _, extras = item.partition("[")
        extras = set(extras.rstrip("]").split(",")) - {""}
        key = (norm(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        todo += _requires(name, extras)
    return {n for n, _ in seen}


def env_closure(path: Path) -> set[str]:
    env = read_env(path)
    names = list(env["pins"])
    names += [f"llmscape[{m.group(1)}]" for o in env["options"] if (m := re.match(r"-e \.\.\[(\w+)\]", o))]
    return closure(names) | {"pip", "setuptools", "wheel"}


def preamble_distributions() -> set[str]:
    """What Snakemake's own script preamble imports in a job (it puts its package on the job's path)."""
    code = ("import snakemake.script, snakemake.io\nfrom llmscape.rulekit import imported_distributions\n"
            "print(' '.join(imported_distributions()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split()) - {"llmscape"}


# What each stage's jobs import from the library, beyond their script (its heavy modules load lazily)
STAGE_MODULES = {
    "prepare": ["llmscape.data", "llmscape.models"],
    "extract": ["llmscape.extract", "llmscape.models", "transformers.models.llama.modeling_llama"],
    "geometry": ["llmscape.geometry", "llmscape.geometry.plots", "llmscape.geometry.resolution", "dadapy"],
    "spectra": ["llmscape.spectra", "llmscape.spectra.intervene", "llmscape.spectra.plots"],
    "finetune": ["llmscape.finetune.train", "llmscape.finetune.launch", "peft", "accelerate",
                 "transformers.models.llama.modeling_llama"],
    "join": ["llmscape.join.correlate", "llmscape.join.plots", "llmscape.join.tables"],
}

def imports_within(stage: str, env_path: Path, workdir: Path) -> subprocess.CompletedProcess:
    """Import the stage's library modules and its environment's packages in a Python that sees only
    the environment's closure: a folder of links to those distributions' installed files, the standard
    library, and nothing else of this machine. Succeeds when the environment is enough for the stage."""
    allowed = env_closure(env_path) | preamble_distributions()
    site = workdir / f"site-{stage}"
    site.mkdir(parents=True, exist_ok=True)
    tops = {}
    for dist in metadata.distributions():
        name = norm(dist.metadata["Name"])
        if name not in allowed or name == "llmscape":
            continue
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            if not (site / top).exists() and (base / top).exists():
                (site / top).symlink_to(base / top)
    for top, dists in metadata.packages_distributions().items():
        for d in dists:
            if not top.startswith("_"):
                tops.setdefault(norm(d), top)
    modules = [tops[p] for p in read_env(env_path)["pins"] if p in tops]
    code = f"import importlib\nfor m in {modules + STAGE_MODULES[stage]!r}:\n    importlib.import_module(m)\n"
    # -S: no site-packages; the path is the standard library, the closure's links and the checkout's src/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "src")]))
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)


# Imported when this machine has them installed, by libraries that probe for them (torch: opt_einsum;
# pyarrow: cloudpickle; jax: psutil; transformers and accelerate: scipy, pillow, protobuf, tabulate,
# attrs, and urllib3 through botocore), never required: imports_within() imports each stage without them.
OPTIONAL_IMPORTS = {"opt-einsum", "cloudpickle", "psutil", "scipy", "pillow", "protobuf", "tabulate", "attrs",
                    "urllib3"}
