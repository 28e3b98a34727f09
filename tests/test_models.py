"""Model cards: checksums that identify weights, not file layouts; clear errors for bad model names."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmscape import models

ROOT = Path(__file__).resolve().parents[1]


def test_checksum_ignores_header_order_but_not_tensor_values(tmp_path):
    t = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}
    for name, meta in (("x", {"format": "pt", "z": "1"}), ("y", {"z": "1", "format": "pt", "extra": "2"})):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"), metadata=meta)
    assert models.weights_checksum(tmp_path / "x") == models.weights_checksum(tmp_path / "y")
    (tmp_path / "z").mkdir()
    save_file({**t, "a.weight": torch.ones(4) * 1.0001}, str(tmp_path / "z" / "model.safetensors"))
    assert models.weights_checksum(tmp_path / "z") != models.weights_checksum(tmp_path / "x")


def test_checksum_needs_weights(tmp_path):
    with pytest.raises(models.ModelError, match="no \\*.safetensors"):
        models.weights_checksum(tmp_path)


@pytest.mark.parametrize("name, label", [("smollm2-135m", "smollm2-135m"),
                                         ("meta-llama/Meta-Llama-3-8B", "Meta-Llama-3-8B"),
                                         ("/data/models/my model/", None)])
def test_model_labels_are_path_safe(name, label):
    if label is None:
        with pytest.raises(models.ModelError, match="not path-safe"):
            models.model_label(name)
    else:
        assert models.model_label(name) == label


def _tiny_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    save_file({"a.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, d / "model.safetensors")
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("damage, message", [
    ("length", "corrupt safetensors header"),      # the 8-byte header length overwritten (was an OverflowError)
    ("json", "corrupt safetensors header"),        # garbage inside the JSON header (was a JSONDecodeError)
    ("truncate", "is truncated"),                  # the tensor data cut short
])
def test_damaged_weights_name_the_file_and_the_fix(tmp_path, damage, message):
    import json as _json

    d = _tiny_folder(tmp_path)
    f = d / "model.safetensors"
    ok = models.weights_checksum(d)
    card = tmp_path / "model.json"
    card.write_text(_json.dumps(dict(path=str(d), checksum=ok, model="m", variant="base")))
    assert models.read_card(card)["checksum"] == ok and models.check_weight_files(d) == 1
    raw = bytearray(f.read_bytes())
    if damage == "length":
        raw[:8] = (2 ** 62).to_bytes(8, "little")
    elif damage == "json":
        raw[10:14] = b"\xff\xfe{{"
    else:
        raw = raw[:-40]
    f.write_bytes(bytes(raw))
    with pytest.raises(models.ModelError, match=message) as e:
        models.read_card(card)
    assert str(f) in str(e.value) and "Fix:" in str(e.value)


def test_a_damaged_variant_names_the_one_job_that_rewrites_it(tmp_path):
    """The fix forces the model card written by the same job as the weights (intervene for a variant,
    finetune for a run), which reruns that job only, not the whole rule; a base model is fetched again."""
    import re

    rules = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    cases = [(("variants", "srank-all-0.5", "hf"), "results/models/{model}/srank-{group}-{target}/model.json"),
             (("finetune", "lora-r8", "weights"), "results/models/{model}/{run}/model.json")]
    for where, card_pattern in cases:
        folder = tmp_path.joinpath("results", where[0], "m", *where[1:])
        folder.mkdir(parents=True)
        f = folder / "model.safetensors"
        f.write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
        with pytest.raises(models.ModelError, match="corrupt safetensors header") as e:
            models.check_weight_files(folder)
        command = re.search(r"`(snakemake [^`]+)`", str(e.value)).group(1)
        assert command == f"snakemake --cores 1 --force results/models/m/{where[1]}/model.json"
        assert card_pattern in rules  # that card is an output of the job that writes these weights
    base = _tiny_folder(tmp_path)
    (base / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(models.ModelError, match="download or reinstall"):
        models.check_weight_files(base)


def test_full_weight_verification_on_request(tmp_path, monkeypatch):
    import json as _json

    d = _tiny_folder(tmp_path)
    card = tmp_path / "model.json"
    card.write_text(_json.dumps(dict(path=str(d), checksum="0" * 64, model="m", variant="base")))
    models.read_card(card)  # the cheap check reads headers only
    monkeypatch.setenv("LLMSCAPE_VERIFY_WEIGHTS", "1")
    with pytest.raises(models.ModelError, match="is not the card's"):
        models.read_card(card)


def test_every_stage_error_is_an_llmscape_error():
    import importlib

    from llmscape.errors import LlmscapeError

    names = {"llmscape.extract": "ExtractError", "llmscape.spectra.stream": "SpectraError",
             "llmscape.spectra.adaptive": "AdaptiveRankError", "llmscape.spectra.intervene": "InterventionError",
             "llmscape.finetune.common": "FinetuneError", "llmscape.assets": "AssetError",
             "llmscape.geometry": "GeometryError", "llmscape.prompts": "PromptError", "llmscape.data": "DataError",
             "llmscape.plan": "PlanError", "llmscape.io": "OutputError", "llmscape.configcheck": "ConfigError",
             "llmscape.models": "ModelError", "llmscape.join.columns": "JoinError", "llmscape.devices": "DeviceError"}
    for module, name in names.items():
        assert issubclass(getattr(importlib.import_module(module), name), LlmscapeError), name


def test_local_config_dir_reads_only_this_machine(tmp_path, monkeypatch):
    """Where the DAG-build checks find a model's config.json: a folder, the HF cache, the published
    configurations; a hub id found nowhere gives None (checked in the job), never a download."""
    from pathlib import Path

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail loudly
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    known = Path(__file__).resolve().parents[1] / "bench" / "configs"
    d = _tiny_folder(tmp_path)
    assert models.local_config_dir(str(d), tmp_path) == d
    assert models.local_config_dir("meta-llama/Meta-Llama-3-70B", tmp_path, known) == known / "llama3-70b"
    assert models.local_config_dir("someone/unknown-model", tmp_path, known) is None
    assert models.local_config_dir("smollm2-135m", tmp_path / "nothing") is None  # not converted yet
    snap = tmp_path / "cache" / "models--someone--cached" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "cache" / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "cache" / "models--someone--cached" / "refs" / "main").write_text("a" * 40)
    assert models.local_config_dir("someone/cached", tmp_path) == snap


def test_a_device_map_planned_on_meta_weights_loads_the_same_model(tmp_path, base_card, loaded_model):
    """The job plans its device map before reading any weight (models.meta_device_map, on a meta-device
    copy) and loads with it. Without GPUs the same plan puts part of the real SmolLM2 on the CPU and
    the rest on disk; the hidden states of every layer equal the model in one piece, bit for bit."""
    import torch

    tok, whole = loaded_model
    placed = models.meta_device_map(base_card["path"], {"cpu": 250_000_000}, torch.float32, strategy="sequential")
    assert {"cpu", "disk"} <= set(placed.values())
    _, sharded = models.load(base_card["path"], dtype="float32", device="cpu", device_map=placed,
                             offload_folder=str(tmp_path / "offload"))
    assert dict(sharded.hf_device_map) == placed
    ids = tok(["Question: What is 2 + 2?\nA. 3\nB. 4\nAnswer:", "The capital of France is"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        a = whole(**ids, output_hidden_states=True).hidden_states
        b = sharded(**ids, output_hidden_states=True).hidden_states
    assert len(a) == len(b) == whole.config.num_hidden_layers + 1
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_weight_check_that_ran_is_logged_and_covers_adapters(tmp_path, monkeypatch, caplog):
    """Every job that reads weights reads its card through read_card, whose log says which check ran:
    quick (headers) or full (LLMSCAPE_VERIFY_WEIGHTS=1: the checksum). The full one covers an adapter
    variant too: a changed adapter on an intact base is refused."""
    import json as _json
    import logging

    from llmscape import adapters

    d = _tiny_folder(tmp_path)
    a = adapters.write_adapter({"a.weight": {"full": torch.ones(8, 8)}}, tmp_path / "adapter")
    card = tmp_path / "model.json"
    card.write_text(_json.dumps(dict(path=str(d), adapter=str(a), model="m", variant="ft",
                                     checksum=adapters.variant_checksum(d, a))))
    assert adapters.variant_checksum(d, a) == adapters.variant_checksum(d, a, models.weights_checksum(d))
    assert adapters.variant_checksum(d, a) != models.weights_checksum(d)
    caplog.set_level(logging.INFO, logger="llmscape.models")
    models.read_card(card)
    assert "weight check of" in caplog.text and ": quick (" in caplog.text and ": full (" not in caplog.text
    monkeypatch.setenv("LLMSCAPE_VERIFY_WEIGHTS", "1")
    caplog.clear()
    models.read_card(card)
    assert ": full (checksum of every tensor, base and adapter," in caplog.text
    adapters.write_adapter({"a.weight": {"full": torch.ones(8, 8) * 2}}, a)  # the adapter changed since
    with pytest.raises(models.ModelError, match="is not the card's"):
        models.read_card(card)
    monkeypatch.delenv("LLMSCAPE_VERIFY_WEIGHTS")
    models.read_card(card)  # the quick check cannot see it: only the full one reads the bytes
