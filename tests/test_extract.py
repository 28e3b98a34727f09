"""Extraction on the real SmolLM2-135M and real MMLU questions."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from checkout import child_env
from llmscape import data, extract as E, models
from llmscape.prompts import PromptError

pytestmark = pytest.mark.slow  # the real SmolLM2-135M on real MMLU prompts


@pytest.fixture(scope="module")
def rows_pool(small_data):
    return data.load_prepared(small_data)


def _run(card, rows_pool, loaded_model, path, **kw):
    rows, pool = rows_pool
    tok, model = loaded_model
    cfg = E.ExtractConfig(**{"token_budget": 1024, **kw})
    acc = E.extract(card, rows, pool, cfg, path, path.with_suffix(".json"), model=model, tok=tok)
    return acc, E.read_states(path)


@pytest.mark.parametrize("shots", [0, 2])
def test_prefix_sharing_gives_the_same_states(tmp_path, base_card, rows_pool, loaded_model, shots):
    _, shared = _run(base_card, rows_pool, loaded_model, tmp_path / "a.h5", shots=shots, prefix_sharing=True)
    _, plain = _run(base_card, rows_pool, loaded_model, tmp_path / "b.h5", shots=shots, prefix_sharing=False)
    assert shared["attrs"]["prefix_sharing"] and not plain["attrs"]["prefix_sharing"]
    scale = np.abs(plain["hidden"]).max(axis=-1, keepdims=True)
    assert np.abs(shared["hidden"] - plain["hidden"]).max() / scale.max() < 1e-4  # fp32 tolerance
    np.testing.assert_array_equal(shared["pred"], plain["pred"])


def test_states_match_a_plain_full_forward_pass(tmp_path, base_card, rows_pool, loaded_model):
    """Reference: batch of one, the full prompt, output_hidden_states; input norm applied by hand."""
    rows, pool = rows_pool
    tok, model = loaded_model
    _, st = _run(base_card, rows_pool, loaded_model, tmp_path / "a.h5", shots=2)
    from llmscape import prompts as P

    r = rows.sort_values("question_id").iloc[4]
    ids = tok(P.build_prompt(r, pool, 2), return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        hs = out.hidden_states
        for layer in (0, 7, 29):
            ref = model.model.layers[layer].input_layernorm(hs[layer])[0, -1].numpy()
            np.testing.assert_allclose(st["hidden"][layer, 4], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st["hidden"][30, 4], hs[30][0, -1].numpy(), rtol=1e-4, atol=1e-4)  # final norm
    letters = E.letter_token_ids(tok)
    assert st["pred"][4] == int(out.logits[0, -1, letters[0]].argmax())


def test_a_model_dispatched_over_devices_gives_the_same_states(tmp_path, base_card, rows_pool, loaded_model):
    # models larger than one GPU are sharded with accelerate's device map (extract.device_map); here,
    # without GPUs, the same path puts part of the model on the CPU and offloads the rest to disk
    _, whole = _run(base_card, rows_pool, loaded_model, tmp_path / "a.h5", shots=2)
    rows, pool = rows_pool
    cfg = E.ExtractConfig(shots=2, device="cpu", dtype="float32", token_budget=1024, device_map="auto",
                          max_memory={"cpu": "250MB"}, offload_folder=str(tmp_path / "offload"))
    E.extract(base_card, rows, pool, cfg, tmp_path / "b.h5")
    sharded = E.read_states(tmp_path / "b.h5")
    tok, model = models.load(base_card["path"], device="cpu", device_map="auto", max_memory={"cpu": "250MB"},
                             offload_folder=str(tmp_path / "offload2"))
    assert {"cpu", "disk"} <= set(map(str, model.hf_device_map.values()))  # really split, partly on disk
    assert np.array_equal(sharded["hidden"], whole["hidden"])
    assert np.array_equal(sharded["pred"], whole["pred"])


def test_hdf5_schema(tmp_path, base_card, rows_pool, loaded_model):
    acc, _ = _run(base_card, rows_pool, loaded_model, tmp_path / "s.h5", shots=1, store_dtype="float16")
    rows, _ = rows_pool
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["hidden"].shape == (31, len(rows), 576) and f["hidden"].dtype == np.float16
        assert f["hidden"].chunks[0] == 1 and f["hidden"].chunks[2] == 576  # one layer reads contiguously
        assert f["letter_logits"].shape == (len(rows), 2, 4)
        assert list(f["question_id"][:]) == sorted(rows.question_id)
        assert set(f["subject"].asstr()[:]) == {"abstract_algebra", "anatomy", "world_religions"}
        assert f["layer_name"].asstr()[0] == "layers.0.input_layernorm" and f["layer_name"].asstr()[-1] == "norm"
        assert "done" not in f
        assert f["hidden"].fletcher32 and f["letter_logits"].fletcher32  # per-chunk checksums
        a = dict(f.attrs)
    assert a["complete"] and a["adapter"] == ""  # the completion mark, written last
    assert a["shots"] == 1 and a["site"] == "norm" and a["checksum"] == base_card["checksum"]
    assert a["template_hash"] and json.loads(a["versions"])["torch"].startswith("2.13")
    assert 0 <= acc["accuracy"] <= 1 and set(acc["per_subject"]) == {"abstract_algebra", "anatomy", "world_religions"}
    assert not (tmp_path / "s.h5.partial").exists()


def test_residual_site_is_the_unnormalised_stream(tmp_path, base_card, rows_pool, loaded_model):
    _, norm = _run(base_card, rows_pool, loaded_model, tmp_path / "n.h5", shots=0)
    _, res = _run(base_card, rows_pool, loaded_model, tmp_path / "r.h5", shots=0, site="residual")
    tok, model = loaded_model
    # applying block 5's input norm to the raw stream gives the norm site
    with torch.no_grad():
        normed = model.model.layers[5].input_layernorm(torch.from_numpy(res["hidden"][5])).numpy()
    np.testing.assert_allclose(normed, norm["hidden"][5],
                               rtol=1e-4, atol=1e-4)


DRIVER = """
import json, pathlib, logging
logging.basicConfig(level=logging.INFO)
from llmscape import data, models, extract as E
rows, pool = data.load_prepared({data!r})
card = json.loads(pathlib.Path({card!r}).read_text())
E.extract(card, rows, pool, E.ExtractConfig(shots=2, token_budget=200, max_batch=2), {out!r}, threads=1)
"""


def test_killed_extraction_resumes_from_its_last_batch(tmp_path, base_card, small_data, rows_pool, loaded_model):
    card = tmp_path / "card.json"
    card.write_text(json.dumps(base_card))
    out = tmp_path / "k.h5"
    code = DRIVER.format(data=str(small_data), card=str(card), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=child_env())
    partial = tmp_path / "k.h5.partial"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                done = int(f["done"][:].sum())
        except (OSError, KeyError):
            done = 0
        if done >= 4:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= done < 18, done
    assert partial.exists() and not out.exists()  # a killed job leaves no final file behind
    res = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=child_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr and "questions already done" in res.stderr
    assert out.exists() and not partial.exists()
    _, full = _run(base_card, rows_pool, loaded_model, tmp_path / "full.h5", shots=2)
    resumed = E.read_states(out)
    np.testing.assert_allclose(resumed["hidden"], full["hidden"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(resumed["pred"], full["pred"])


def test_bad_inputs_fail_early_with_the_fix(tmp_path, base_card, rows_pool):
    rows, pool = rows_pool
    with pytest.raises(PromptError, match="6 shots asked.*holds 5"):
        E.extract(base_card, rows, pool, E.ExtractConfig(shots=6), tmp_path / "x.h5")
    with pytest.raises(models.ModelError, match="unknown model 'no-such-model'"):
        models.prepare("no-such-model", tmp_path / "c.json")
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.prepare(str(tmp_path), tmp_path / "c.json")
    with pytest.raises(E.ExtractError, match="store_dtype 'bfloat16'"):
        E.ExtractConfig(store_dtype="bfloat16").validate()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "file" / "x.h5"
            (tmp_path / "file").write_text("")
        else:
            target = ro / "x.h5"
        from llmscape.io import OutputError

        with pytest.raises(OutputError, match="Fix"):
            E.extract(base_card, rows, pool, E.ExtractConfig(shots=0), target)
    finally:
        ro.chmod(0o700)


def _paths(tree):
    """(prompt, its segments from the root) for every leaf of a prefix tree."""
    out, stack = [], [(tree, [])]
    while stack:
        node, segs = stack.pop()
        segs = segs + [node.segment]
        if node.prompt is not None:
            out.append((node.prompt, segs))
        stack.extend((c, segs) for c in node.children)
    return out


def test_prefix_tree_shape_and_token_counts():
    a, b, c, d = [1, 2, 3, 4, 5], [1, 2, 3, 6, 7], [1, 2, 3, 6, 8], [1, 9]
    ids = [a, b, c, d, [1, 2, 3], [1, 2, 3], [1, 2], [1, 2, 3]]  # duplicates; a prompt inside another
    keys = ["s"] * 4 + ["dup"] * 2 + ["pre", "pre"]
    trees = E.group_trees(ids, keys, min_shared=1)
    for t in trees:  # every prompt is its path's segments joined, and keeps a token of its own
        for i, segs in _paths(t):
            assert sum(segs, []) == ids[i] and len(segs[-1]) >= 1
    s = trees[0].children[0]  # [1], then [9] | [2, 3] -> ([4, 5] | [6] -> ([7] | [8]))
    assert s.segment == [1] and sorted(len(k.children) for k in s.children) == [0, 2]
    assert [E.tree_tokens(t) for t in trees] == [1 + 1 + 2 + 2 + 1 + 1 + 1, 2 + 1 + 1, 1 + 1 + 2]
    assert E.held_tokens(trees[0]) == 1 + 2 + 1  # path [1] + [2, 3] + [6]
    # a shared segment below the top shorter than min_shared is handed down: [6] runs once per child
    assert E.tree_tokens(E.group_trees(ids[:4], keys[:4], min_shared=2)[0]) == 10
    counts = E.count_prompt_tokens(ids, keys, min_shared=1)
    assert counts["plain"] == sum(map(len, ids)) == 28 and counts["shared"] == 9 + 4 + 4
    assert E.count_prompt_tokens(ids, None)["shared"] == 28  # no keys, no sharing


class _FedTokens:
    """Counts the tokens the decoder is really given (its attention mask's new columns) and whether
    any batch was padded, through a forward pre-hook on the decoder."""

    def __init__(self, dec):
        self.tokens, self.padded, self.batches = 0, False, 0
        self.handle = dec.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        new = mask[:, -ids.shape[1]:] if mask is not None else torch.ones_like(ids)
        self.tokens += int(new.sum())
        self.padded |= bool((new == 0).any())
        self.batches += 1


@pytest.mark.parametrize("order", ["fixed", "permuted"])
def test_prefix_tree_states_equal_unshared_for_0_to_5_shots(rows_pool, loaded_model, order):
    """The tree (token-budget batches that mix segment lengths, so padded) against every prompt run
    whole without a cache; and the tokens fed to the decoder are the ones count_prompt_tokens predicts."""
    from llmscape import prompts as P

    rows, pool = rows_pool
    rows = rows.groupby("subject").head(3).sort_values("question_id").reset_index(drop=True)
    tok, model = loaded_model
    cap = E.LastTokenCapture(model, "norm")
    try:
        for shots in range(6):
            ids = E.tokenize(tok, P.build_prompts(rows, pool, shots, order))
            out = {}
            for keys in (rows.subject.tolist(), None):
                fed = _FedTokens(model.model)
                st = np.zeros((31, len(ids), 576), np.float32)
                lg = np.zeros((len(ids), 2, 4), np.float32)
                for res in E.run_batches(model, tok, ids, keys, token_budget=1500, max_batch=8, capture=cap):
                    st[:, res.positions], lg[res.positions] = res.states.numpy(), res.letter_logits
                fed.handle.remove()
                out[keys is None] = st, lg, fed
            (st, lg, fed), (st0, lg0, fed0) = out[False], out[True]
            counts = E.count_prompt_tokens(ids, rows.subject.tolist())
            assert E.count_config_tokens(tok, rows, pool, shots, order) == dict(counts, questions=len(rows))
            assert fed.tokens == counts["shared"] < fed0.tokens == counts["plain"], shots
            assert not fed.padded, shots  # packed: a batch of mixed lengths runs without padding
            assert np.abs(st - st0).max() / np.abs(st0).max() < 1e-4, shots  # fp32 tolerance
            np.testing.assert_allclose(lg, lg0, rtol=1e-4, atol=1e-4)
    finally:
        cap.remove()


def test_packed_batches_equal_padded_batches(rows_pool, loaded_model):
    """The packed path (a batch's segments in one row behind one shared path) against the padded one (a
    row per segment, the path copied per row), on the permuted 5-shot tree with small batches: inner
    nodes and leaves in one batch, several batches per node; same states, logits and tokens fed."""
    from llmscape import prompts as P

    rows, pool = rows_pool
    tok, model = loaded_model
    assert E.packs(model)  # Llama: the default path is the packed one
    ids = E.tokenize(tok, P.build_prompts(rows, pool, 5, "permuted"))
    cap = E.LastTokenCapture(model, "norm")
    out = {}
    try:
        for packed in (True, False):
            fed = _FedTokens(model.model)
            st = np.zeros((31, len(ids), 576), np.float32)
            lg = np.zeros((len(ids), 2, 4), np.float32)
            for res in E.run_batches(model, tok, ids, rows.subject.tolist(), token_budget=600, max_batch=4,
                                     capture=cap, packed=packed):
                st[:, res.positions], lg[res.positions] = res.states.numpy(), res.letter_logits
            fed.handle.remove()
            out[packed] = st, lg, fed
    finally:
        cap.remove()
    (st, lg, fed), (st0, lg0, fed0) = out[True], out[False]
    assert fed.tokens == fed0.tokens == E.count_prompt_tokens(ids, rows.subject.tolist())["shared"]
    assert not fed.padded and fed0.padded
    assert np.abs(st - st0).max() / np.abs(st0).max() < 1e-4  # fp32 tolerance
    np.testing.assert_allclose(lg, lg0, rtol=1e-4, atol=1e-4)


def test_permuted_5_shot_states_match_a_plain_forward_pass(tmp_path, base_card, rows_pool, loaded_model):
    """The paper's protocol through extract(): every layer and the letter logits of every question
    against the model's own forward pass over the whole prompt (batch of one, no cache)."""
    from llmscape import prompts as P

    rows, pool = rows_pool
    tok, model = loaded_model
    _, st = _run(base_card, rows_pool, loaded_model, tmp_path / "p.h5", shots=5, shot_order="permuted")
    assert st["attrs"]["prefix_sharing"] and st["attrs"]["shot_order"] == "permuted"
    rows = rows.sort_values("question_id").reset_index(drop=True)
    texts = P.build_prompts(rows, pool, 5, "permuted")
    assert len({t[:400] for t in texts}) > 1  # the shots really are in different orders
    letters = E.letter_token_ids(tok)
    with h5py.File(tmp_path / "p.h5") as f:
        logits = f["letter_logits"][:]
    with torch.no_grad():
        for i, text in enumerate(texts):
            out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
            hs = out.hidden_states
            ref = [model.model.layers[j].input_layernorm(hs[j])[0, -1] for j in range(30)] + [hs[30][0, -1]]
            np.testing.assert_allclose(st["hidden"][:, i], torch.stack(ref).numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(logits[i], out.logits[0, -1, letters].numpy(), rtol=1e-4, atol=1e-4)


def test_an_interrupted_permuted_extraction_resumes(tmp_path, base_card, rows_pool, loaded_model):
    rows, pool = rows_pool
    tok, model = loaded_model
    cfg = E.ExtractConfig(shots=2, shot_order="permuted", token_budget=300, max_batch=2)
    path = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        E.extract(base_card, rows, pool, cfg, path, model=model, tok=tok, stop_after_batches=3)
    with h5py.File(tmp_path / "r.h5.partial") as f:
        assert 3 <= int(f["done"][:].sum()) < len(rows)
    E.extract(base_card, rows, pool, cfg, path, model=model, tok=tok)
    _, full = _run(base_card, rows_pool, loaded_model, tmp_path / "full.h5", shots=2, shot_order="permuted")
    resumed = E.read_states(path)
    np.testing.assert_allclose(resumed["hidden"], full["hidden"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(resumed["pred"], full["pred"])
