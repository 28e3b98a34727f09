"""Model cards: checksums that identify weights, not file layouts; clear errors for bad model names."""
import pytest
import torch
from safetensors.torch import save_file

from llmscape import models


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
