"""Cases that used to pass silently: an extraction of damaged weights, prompts past the model's context,
damaged labels, a file copied over another, a rebuild hint that reran 23 jobs, a faulty ADP assignment.

The extractions here run a tiny random Llama (3 blocks, a 256-token context) with the embedded
tokenizer on real MMLU questions: a few seconds each, and a context short enough for 2-shot prompts to
exceed it."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from llmscape import data, extract as E, geometry as G, models
from llmscape.geometry.adp import adp_fault, checked_adp
from llmscape.integrity import rebuild_command

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory, tok):
    """Card of a tiny random Llama whose context is CONTEXT tokens, saved with the embedded tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return models.prepare(str(folder), folder.parent / "model.json")


@pytest.fixture(scope="module")
def rows_pool(small_data):
    return data.load_prepared(small_data)


def run_extract(card, rows_pool, out: Path, model=None, tok=None, **cfg):
    rows, pool = rows_pool
    config = E.ExtractConfig(**{"dtype": "float32", "device": "cpu", "token_budget": 2048, **cfg})
    return E.extract(card, rows, pool, config, out, out.with_suffix(".json"), model=model, tok=tok)


@pytest.fixture(scope="module")
def extraction(tiny_card, rows_pool, tmp_path_factory):
    """A finished 0-shot extraction of the tiny model, where the workflow puts it."""
    out = tmp_path_factory.mktemp("reps") / "results" / "reps" / tiny_card["label"] / "base" / "0shot.h5"
    out.parent.mkdir(parents=True)
    run_extract(tiny_card, rows_pool, out)
    return out


# --- the extraction checks what it writes -------------------------------------------------------------

def damage_tensor(folder: Path, name: str) -> None:
    """Overwrite the first 64 bytes of tensor ``name``'s data in a safetensors file with 0xFF (a float32
    NaN pattern), leaving its header intact: the quick weight check cannot see it."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8: 8 + n])[name]["data_offsets"][0] + 8 + n
    raw[begin: begin + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))


def test_damaged_weights_stop_the_extraction_naming_the_layers(tiny_card, rows_pool, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_card["path"], folder)
    damage_tensor(folder, "model.layers.1.mlp.down_proj.weight")
    card = dict(tiny_card, path=str(folder))
    out = tmp_path / "0shot.h5"
    with pytest.raises(E.ExtractError) as e:
        run_extract(card, rows_pool, out)
    msg = str(e.value)
    # block 1's output is NaN: the states entering block 2 and the final norm, and the logits
    assert "layers 2 (layers.2.input_layernorm), 3 (norm) (2 of 4) and in the letter logits" in msg
    assert "LLMSCAPE_VERIFY_WEIGHTS=1" in msg and str(folder) in msg
    assert not out.exists() and not out.with_suffix(".json").exists()
    with h5py.File(out.with_name(out.name + ".partial")) as f:
        assert not f.attrs.get("complete", False) and not f["done"][:].any()  # nothing of it was stored


def test_states_beyond_the_store_dtype_are_named_as_such(tiny_card, rows_pool, tmp_path):
    tok, model = models.load(tiny_card["path"], dtype="float32", device="cpu")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e8)  # a residual stream of ~1e6: finite in float32 only
    with pytest.raises(E.ExtractError, match="exceed what extract.store_dtype = float16 holds.*Fix: "
                                             "extract.store_dtype: float32") as e:
        run_extract(tiny_card, rows_pool, tmp_path / "0shot.h5", model=model, tok=tok, site="residual",
                    store_dtype="float16")
    assert "layers 0 (layers.0.input)" in str(e.value)


def test_prompts_longer_than_the_context_are_refused_before_the_first_batch(tiny_card, rows_pool, tmp_path):
    rows, pool = rows_pool
    out = tmp_path / "2shot.h5"
    with pytest.raises(E.ExtractError) as e:
        run_extract(tiny_card, rows_pool, out, shots=2)
    msg = str(e.value)
    assert f"longer than the model's context of {CONTEXT} tokens" in msg
    longest = int(re.search(r"has (\d+) tokens", msg).group(1))
    assert longest > CONTEXT and f"context of at least {longest} tokens" in msg
    assert "Fix: fewer shots (extract.shots, extract.variant_shots)" in msg
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()  # no file begun


# --- every dataset is checksummed and checked on read -------------------------------------------------

def overwrite(path: Path, dataset: str, rng) -> None:
    """Damage one dataset as a bad disk or a stray write would: random bytes over its stored values
    (variable-length strings: a changed character inside the stored string itself)."""
    with h5py.File(path) as f:
        ds = f[dataset]
        if h5py.check_string_dtype(ds.dtype):
            old = ds.asstr()[0].encode()
            offset, size = None, 0
        elif ds.chunks:
            info = ds.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
        else:
            offset, size = ds.id.get_offset(), ds.id.get_storage_size()
    raw = bytearray(path.read_bytes())
    if offset is None:
        at = raw.find(old)
        assert at > 0
        raw[at] = ord("Z") if raw[at] != ord("Z") else ord("Y")
    else:
        raw[offset: offset + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


READ_BY_LATER_STAGES = ["answer", "subject", "question_id", "pred", "pred_nospace", "letter_logits", "n_tokens",
                        "layer_name"]


@pytest.mark.parametrize("dataset", READ_BY_LATER_STAGES)
def test_a_damaged_dataset_is_refused_with_the_rebuild_command(extraction, tmp_path, dataset):
    damaged = tmp_path / "results" / "reps" / "tiny" / "base" / "0shot.h5"
    damaged.parent.mkdir(parents=True)
    shutil.copy(extraction, damaged)
    overwrite(damaged, dataset, np.random.default_rng(0))
    for read, error in ((G.read_labels, G.GeometryError), (E.read_states, E.ExtractError),
                        (lambda p: G.files.read_datasets(p, ["pred", "answer"]), G.GeometryError)):
        with pytest.raises(error) as e:
            read(damaged)
        msg = str(e.value)
        assert str(damaged) in msg and repr(dataset) in msg and rebuild_command(damaged) in msg, msg
    # the intact file reads, with the values written
    assert G.read_labels(extraction)["answer"].max() <= 3


def test_every_dataset_of_an_extraction_carries_its_checksum(extraction):
    with h5py.File(extraction) as f:
        assert set(READ_BY_LATER_STAGES) <= set(f)
        for name, ds in f.items():
            assert ds.fletcher32 if name == "hidden" else len(ds.attrs["sha256"]) == 64, name


def test_an_extraction_without_checksums_is_refused(extraction, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(extraction, old)
    with h5py.File(old, "r+") as f:
        del f["answer"].attrs["sha256"]
    with pytest.raises(G.GeometryError, match="dataset 'answer' has no checksum"):
        G.read_labels(old)


# --- an extraction is the one its path names ----------------------------------------------------------

def test_an_extraction_under_another_name_is_refused(extraction, tiny_card, tmp_path):
    label = tiny_card["label"]
    assert G.read_labels(extraction, model=label, variant="base", shots=0)["shape"][0] == 4  # its own name
    copied = tmp_path / "2shot.h5"  # a 0-shot file copied over the 2-shot one
    shutil.copy(extraction, copied)
    with pytest.raises(G.GeometryError, match=r"its attributes say shots 0 \(path: 2\)") as e:
        G.compute_geometry(copied, G.GeometryParams(), model=label, variant="base", shots=2)
    assert rebuild_command(copied) in str(e.value)
    for names, said in ((dict(variant="lora-r8"), "variant 'base' (path: 'lora-r8')"),
                        (dict(model="llama3-8b"), f"model '{label}' (path: 'llama3-8b')")):
        with pytest.raises(G.GeometryError, match=re.escape(said)):
            G.read_labels(copied, **names)
    with h5py.File(copied, "r+") as f:
        f.attrs["template_hash"] = "0123456789abcdef"
    with pytest.raises(G.GeometryError, match="prompts of another template"):
        G.read_labels(copied)


# --- the rebuild hint reruns one job ------------------------------------------------------------------

def snakemake(workdir: Path, *args: str, overrides: tuple = ()) -> subprocess.CompletedProcess:
    """Snakemake on the CI config, with the config files ``overrides`` merged over it."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(ROOT / "config" / "ci.yaml"), *map(str, overrides),
           "--config", f"resources_dir={ROOT / 'resources'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def job_counts(stdout: str) -> dict:
    stats = stdout.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    return {line.split()[0]: int(line.split()[1]) for line in stats if line.strip()}


@pytest.mark.slow  # builds the CI DAG three times (about 2 minutes on 2 busy cores)
@pytest.mark.parametrize("per_variant", [False, True], ids=["per_shots", "per_variant"])
def test_the_printed_rebuild_command_schedules_one_extraction(tmp_path, monkeypatch, per_variant):
    """On a finished CI DAG (every output present and up to date, made with --touch), an extraction
    that fails its checks prints a command; that command, followed as printed, schedules exactly one
    job: the extraction of that file, or of its variant's shot counts where one job writes them all
    (the old `--forcerun extract <file>` scheduled 23)."""
    config = ()
    if per_variant:  # one job writes every shot count of a variant
        config = (tmp_path / "per_variant.yaml",)
        config[0].write_text("extract:\n  one_job_per_variant: true\n")
    plan = snakemake(tmp_path, "--summary", "--cores", "1", overrides=config)
    assert plan.returncode == 0, plan.stderr[-3000:]
    outputs = [line.split("\t")[0] for line in plan.stdout.splitlines()[1:] if "\t" in line]
    assert any(o.endswith("0shot.h5") for o in outputs)
    for o in outputs:
        (tmp_path / o).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / o).touch()
    touched = snakemake(tmp_path, "--touch", "--cores", "1", overrides=config)
    assert touched.returncode == 0, touched.stderr[-3000:]

    monkeypatch.chdir(tmp_path)  # the job's view: the path relative to the working directory
    with pytest.raises(G.GeometryError) as e:  # an empty file: not readable HDF5
        G.read_labels("results/reps/smollm2-135m/base/0shot.h5")
    printed = re.search(r"`(snakemake [^`]*)`", str(e.value)).group(1)
    args = shlex.split(printed)[1:]
    dry = snakemake(tmp_path, *args, "-n", overrides=config)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_counts(dry.stdout) == {"extract": 1, "total": 1}, dry.stdout[-3000:]


# --- ADP output is checked, a faulty one recomputed ---------------------------------------------------

def blob_data(seed: int = 0):
    from dadapy import Data

    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.standard_normal((60, 5)) + 8 * i for i in range(4)])
    d = Data(X, maxk=30, verbose=False)
    d.compute_id_2NN()
    d.compute_density_kNN(k=8)
    return d


def test_adp_fault_finds_each_kind_of_damage():
    d = blob_data()
    d.compute_clustering_ADP(Z=1.6, halo=False)
    assert adp_fault(d) == "" and d.N_clusters >= 2
    whole = np.array(d.cluster_assignment, copy=True)
    members = [list(m) for m in d.cluster_indices]
    d.cluster_assignment = whole.copy()
    d.cluster_assignment[5] = 1 << 40  # memory left in np.empty
    assert "labels outside 0.." in adp_fault(d)
    d.cluster_assignment = whole.copy()  # a point missing from its cluster, its label in range by chance
    d.cluster_indices = [[i for i in m if i != 5] for m in members]
    assert "1 of 240 points in no cluster" in adp_fault(d)
    d.cluster_indices = members
    d.cluster_assignment = np.where(whole == 1, 0, whole)  # a cluster count the labels do not match
    assert "members of cluster 1 labelled otherwise" in adp_fault(d)


def damaging_adp(original):
    """DADApy's compiled ADP, then the upstream fault made to happen (a fault injection: the real one
    cannot be produced on demand): three points dropped from their cluster keep np.empty's garbage."""
    def compute(self, *args, **kwargs):
        original(self, *args, **kwargs)
        lost = np.array([0, 7, 11])
        self.cluster_indices = [[i for i in m if i not in lost] for m in self.cluster_indices]
        self.cluster_assignment = np.array(self.cluster_assignment, copy=True)
        self.cluster_assignment[lost] = [-4611686018427387904, 93824992236224, 0]
        return self.cluster_assignment
    return compute


def test_a_faulty_adp_assignment_is_recomputed_and_counted(monkeypatch):
    from dadapy import Data

    from test_geometry import blobs, random_letters

    X, y = blobs(n_per=60, n_blobs=3, dim=6, sep=20.0, seed=3)
    letters = random_letters(len(y))
    params = G.GeometryParams(maxk=40, id_range_max=16, id_scale=4, density_k=8, overlap_k=10, n_boot=4,
                              boot_fraction=0.8)
    draws = G.draw_members(y, params.n_boot, params.boot_fraction, params.seed)
    clean = G.compute_layer_geometry(X, y, letters, params, draws=draws)
    assert clean.row["n_adp_repaired"] == 0

    monkeypatch.setattr(Data, "compute_clustering_ADP", damaging_adp(Data.compute_clustering_ADP))
    d = blob_data()
    assignment, repaired = checked_adp(d, 1.6)
    assert repaired == 1 and adp_fault(d) == "" and set(assignment) == set(range(d.N_clusters))
    damaged = G.compute_layer_geometry(X, y, letters, params, draws=draws)
    assert damaged.row["n_adp_repaired"] == 1 + len(draws)  # the layer's own assignment and each subsample's
    for metric in ("n_clusters", "ari_subjects", "ari_letters", "core_fraction", "ari_subjects_lo"):
        assert damaged.row[metric] == clean.row[metric], metric
    assert "n_adp_repaired" in G.TABLE_COLUMNS
