"""Per-layer last-prompt-token representations of a causal LM on MMLU prompts, into HDF5.

What is kept, per question, at the last prompt token (the ``:`` of ``Answer:``):
  * ``site: norm`` (the paper's): the output of every decoder block's input RMSNorm (layers 0..L-1,
    i.e. the normalised residual stream entering block i) plus the final norm output (layer L);
  * ``site: residual``: the raw residual stream entering every block plus the last block's output.
  * the logits of the four answer letters, with a leading space (" A") and without ("A"), computed
    from the final hidden state and the matching lm_head rows only (no vocabulary-wide logits).

Speed: prompts are tokenised once, sorted by length and batched by a token
budget; forward hooks keep only the last position of each row; the decoder is run without the LM head.
With ``fixed`` shot order every question of a subject starts with the same header and shots: the
longest common *token* prefix of the subject's prompts is run once and its key/value cache is reused
for every batch of that subject (the prefix is found on token ids, so BPE merges across the
prefix/question boundary cannot make it inexact).

HDF5 layout (``results/reps/{model}/{variant}/{shots}shot.h5``):
  hidden         (n_layers, n_questions, d)  float16|float32, chunked (1, <=256, d) with fletcher32 checksums
  question_id    (n,) int64, ascending (the analysis index order)
  subject        (n,) utf-8 str
  answer         (n,) int8 0..3         pred (n,) int8 0..3 (argmax of the " A".." D" logits)
  pred_nospace   (n,) int8 (argmax of the "A".."D" logits, Doimo's constrained prediction)
  letter_logits  (n, 2, 4) float32      [:, 0] = " A".." D", [:, 1] = "A".."D"
  n_tokens       (n,) int32              prompt length in tokens
  layer_name     (n_layers,) utf-8 str
  attrs: model, variant, model_path, adapter (a fine-tuned variant's, or empty), checksum, site, shots, shot_order, shot_seed, dtype, store_dtype,
         template_hash, seed, prefix_sharing, fingerprint, versions (JSON), complete (written last)

The file is written as ``<name>.partial`` and renamed when complete. A killed run resumes from its
last completed batch: rows are marked done after each batch, and a rerun with the same fingerprint
(model checksum, questions, prompt settings) skips them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import torch

from . import prompts as P
from .data import LETTERS
from .io import ensure_writable, package_versions, write_json
from .errors import LlmscapeError

log = logging.getLogger("llmscape.extract")

SITES = ("norm", "residual")


class ExtractError(LlmscapeError, RuntimeError):
    pass


@dataclass
class ExtractConfig:
    shots: int = 0
    shot_order: str = "fixed"
    shot_seed: int = 42
    site: str = "norm"
    device: str = "auto"
    dtype: str = "auto"
    store_dtype: str = "float32"
    token_budget: int = 8192
    max_batch: int = 64
    prefix_sharing: bool = True
    device_map: str | None = None  # shard over the node's GPUs (accelerate), for models larger than one
    max_memory: dict | None = None
    offload_folder: str | None = None

    @classmethod
    def from_dict(cls, d: dict, shots: int) -> "ExtractConfig":
        keys = {f for f in cls.__dataclass_fields__}
        cfg = cls(**{k: v for k, v in d.items() if k in keys and k != "shots"}, shots=int(shots))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.site not in SITES:
            raise ExtractError(f"extract.site {self.site!r} is not one of {SITES}")
        if self.shot_order not in P.SHOT_ORDERS:
            raise ExtractError(f"extract.shot_order {self.shot_order!r} is not one of {P.SHOT_ORDERS}")
        if self.store_dtype not in ("float16", "float32"):
            raise ExtractError(f"extract.store_dtype {self.store_dtype!r}: h5py stores float16 or float32 (no bfloat16)")
        if self.token_budget < 1 or self.max_batch < 1:
            raise ExtractError("extract.token_budget and extract.max_batch must be positive")

    @property
    def shares_prefix(self) -> bool:
        return self.prefix_sharing and self.shot_order == "fixed"


# --------------------------------------------------------------------------- model plumbing

def decoder_parts(model):
    """(decoder, its blocks, its final norm) for HF decoder-only models (Llama, Mistral, Qwen, Gemma...)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(dec, "layers", None)
    norm = getattr(dec, "norm", None)
    if layers is None or norm is None or not all(hasattr(b, "input_layernorm") for b in layers):
        raise ExtractError(f"{type(model).__name__}: expected a decoder with .layers[i].input_layernorm and .norm "
                           "(Llama-style). Fix: use a Llama/Mistral/Qwen/Gemma-architecture causal LM.")
    return dec, layers, norm


def letter_token_ids(tok) -> np.ndarray:
    """(2, 4) token ids: row 0 " A".." D", row 1 "A".."D". Each must be one token."""
    out = np.zeros((2, 4), dtype=np.int64)
    for row, fmt in enumerate((" {}", "{}")):
        for j, letter in enumerate(LETTERS):
            ids = tok(fmt.format(letter), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ExtractError(f"tokenizer splits {fmt.format(letter)!r} into {ids}; letter scoring needs one token")
            out[row, j] = ids[0]
    return out


class LastTokenCapture:
    """Forward hooks that keep one position per row (``self.index``) of every capture site."""

    def __init__(self, model, site: str = "norm"):
        _, layers, norm = decoder_parts(model)
        self.n_layers = len(layers) + 1
        self.index: torch.Tensor | None = None
        self.buf: list[torch.Tensor | None] = [None] * self.n_layers
        self.handles = []
        if site == "norm":
            for i, blk in enumerate(layers):
                self.handles.append(blk.input_layernorm.register_forward_hook(self._out_hook(i)))
            self.handles.append(norm.register_forward_hook(self._out_hook(len(layers))))
            self.names = [f"layers.{i}.input_layernorm" for i in range(len(layers))] + ["norm"]
        elif site == "residual":
            for i, blk in enumerate(layers):
                self.handles.append(blk.register_forward_pre_hook(self._in_hook(i), with_kwargs=True))
            self.handles.append(norm.register_forward_pre_hook(self._in_hook(len(layers)), with_kwargs=True))
            self.names = [f"layers.{i}.input" for i in range(len(layers))] + ["norm.input"]
        else:
            raise ExtractError(f"unknown site {site!r}")

    def _keep(self, i: int, h: torch.Tensor) -> None:
        if self.index is not None:
            rows = torch.arange(h.shape[0], device=h.device)
            self.buf[i] = h[rows, self.index.to(h.device)].detach()

    def _out_hook(self, i):
        def hook(module, args, output):
            self._keep(i, output[0] if isinstance(output, tuple) else output)
        return hook

    def _in_hook(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            self._keep(i, h)
        return hook

    def take(self) -> torch.Tensor:
        """(n_layers, B, d) of the last forward pass."""
        if any(b is None for b in self.buf):
            raise ExtractError("a capture hook did not fire")
        first = self.buf[0].device  # a sharded model's layers live on several devices
        out = torch.stack([b.float().to(first) for b in self.buf])
        self.buf = [None] * self.n_layers
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --------------------------------------------------------------------------- planning

@dataclass
class Group:
    prefix: list[int]                 # token ids shared by every member (may be empty)
    members: list[int]                # positions into the prompt list
    suffixes: list[list[int]] = field(default_factory=list)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def plan_groups(token_ids: list[list[int]], keys: Sequence | None) -> list[Group]:
    """Group prompts (by subject when ``keys`` is given) and split off their common token prefix,
    always leaving at least one token per prompt to run."""
    if keys is None:
        return [Group([], list(range(len(token_ids))), [list(t) for t in token_ids])]
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = []
    for members in groups.values():
        seqs = [token_ids[i] for i in members]
        n = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
        out.append(Group(list(seqs[0][:n]), members, [list(s[n:]) for s in seqs]))
    return out


def plan_batches(group: Group, token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices into ``group.members``, length-sorted (longest first), each batch within the budget:
    rows x longest new-token count <= token_budget; the KV cache of the shared prefix counts at 1/8."""
    order = sorted(range(len(group.members)), key=lambda j: -len(group.suffixes[j]))
    batches, cur, cur_max = [], [], 0
    plen = len(group.prefix)
    for j in order:
        L = len(group.suffixes[j])
        new_max = max(cur_max, L)
        cost = (len(cur) + 1) * (new_max + plen // 8)
        if cur and (cost > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur, new_max = [], L
        cur.append(j)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


# --------------------------------------------------------------------------- running

@dataclass
class BatchResult:
    positions: np.ndarray          # (B,) positions into the prompt list
    states: torch.Tensor | None    # (n_layers, B, d) float32 on CPU, or None without capture
    letter_logits: np.ndarray      # (B, 2, 4)
    n_new_tokens: int


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _expand_cache(cache, batch: int):
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(batch)
    return c


def letter_rows(head, letters: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense copies of the LM head's rows (and bias entries) of the 8 letter tokens: (8, d), (8,) or None.
    Under DeepSpeed ZeRO-3 the head's weight is an empty slice outside a gather (a fine-tuning job's
    evaluation), so it is gathered for the copy; a no-op for every other model (see partitioned.py)."""
    from .partitioned import gathered

    bias = getattr(head, "bias", None)
    with gathered([head.weight, bias]):
        idx = torch.as_tensor(letters, device=head.weight.device).reshape(-1)
        w = head.weight[idx].detach().clone()
        b = bias[idx].detach().clone() if bias is not None else None
    return w, b


@torch.inference_mode()
def run_batches(model, tok, token_ids: list[list[int]], group_keys: Sequence | None, *, token_budget: int,
                max_batch: int, capture: LastTokenCapture | None, skip: np.ndarray | None = None,
                progress: Callable[[int, int], None] | None = None) -> Iterator[BatchResult]:
    """Run every prompt once; yield per-batch last-token states and letter logits."""
    dec, _, _ = decoder_parts(model)
    device = next(model.parameters()).device
    w_letters, b_letters = letter_rows(model.get_output_embeddings(), letter_token_ids(tok))
    pad = _pad_id(tok)
    for group in plan_groups(token_ids, group_keys):
        todo = [j for j in range(len(group.members)) if skip is None or not skip[group.members[j]]]
        if not todo:
            continue
        sub = Group(group.prefix, [group.members[j] for j in todo], [group.suffixes[j] for j in todo])
        prefix_cache = None
        plen = len(sub.prefix)
        if plen:
            if capture is not None:
                capture.index = None
            out = dec(input_ids=torch.tensor([sub.prefix], device=device), use_cache=True)
            prefix_cache = out.past_key_values
        for batch in plan_batches(sub, token_budget, max_batch):
            seqs = [sub.suffixes[j] for j in batch]
            B, S = len(seqs), max(len(s) for s in seqs)
            ids = torch.full((B, S), pad, dtype=torch.long)
            mask = torch.zeros((B, plen + S), dtype=torch.long)
            mask[:, :plen] = 1
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, plen: plen + len(s)] = 1
            last = torch.tensor([len(s) - 1 for s in seqs])
            kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                          position_ids=(plen + torch.arange(S)).unsqueeze(0).expand(B, S).to(device))
            if prefix_cache is not None:
                kwargs.update(past_key_values=_expand_cache(prefix_cache, B), use_cache=True)
            else:
                kwargs.update(use_cache=False)
            if capture is not None:
                capture.index = last
            out = dec(**kwargs)
            h = out.last_hidden_state  # on the last block's device when the model is sharded
            h_last = h[torch.arange(B, device=h.device), last.to(h.device)].to(w_letters.device)
            logits = h_last.float() @ w_letters.float().T
            if b_letters is not None:
                logits = logits + b_letters.float()
            states = capture.take().cpu() if capture is not None else None
            if capture is not None:
                capture.index = None
            positions = np.array([sub.members[j] for j in batch])
            yield BatchResult(positions, states, logits.reshape(B, 2, 4).cpu().numpy(), int(sum(map(len, seqs))))
            if progress:
                progress(B, int(sum(map(len, seqs))))


def tokenize(tok, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in tok(list(texts), add_special_tokens=True)["input_ids"]]


# --------------------------------------------------------------------------- the rule

def fingerprint(checksum: str, question_ids: np.ndarray, cfg: ExtractConfig, seed: int) -> str:
    h = hashlib.sha256()
    h.update(checksum.encode())
    h.update(np.ascontiguousarray(question_ids, dtype=np.int64).tobytes())
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("token_budget", "max_batch", "device")}
    h.update(json.dumps(dict(keep, seed=seed, template=P.template_hash()), sort_keys=True).encode())
    return h.hexdigest()[:24]


def _open_partial(path: Path, fp: str, n_layers: int, n: int, d: int, store_dtype: str) -> h5py.File:
    if path.exists():
        try:
            f = h5py.File(path, "r+")
            if f.attrs.get("fingerprint") == fp and "done" in f and f["hidden"].shape == (n_layers, n, d):
                log.info("resuming %s: %d of %d questions already done", path, int(f["done"][:].sum()), n)
                return f
            f.close()
            log.warning("%s was written with other settings; starting over", path)
        except OSError as e:
            log.warning("%s is unreadable (%s); starting over", path, e)
        path.unlink()
    f = h5py.File(path, "w")
    f.attrs["fingerprint"] = fp
    # per-chunk checksums: a reader finds a flipped or overwritten chunk instead of computing on it
    f.create_dataset("hidden", shape=(n_layers, n, d), dtype=store_dtype, chunks=(1, min(n, 256), d), fletcher32=True)
    f.create_dataset("letter_logits", shape=(n, 2, 4), dtype="float32", chunks=(min(n, 4096), 2, 4), fletcher32=True)
    f.create_dataset("n_tokens", shape=(n,), dtype="int32")
    f.create_dataset("done", shape=(n,), dtype=bool, data=np.zeros(n, bool))
    return f


def extract(card: dict, rows: pd.DataFrame, pool: pd.DataFrame, cfg: ExtractConfig, out_h5: str | Path,
            out_json: str | Path | None = None, *, seed: int = 42, threads: int | None = None,
            model=None, tok=None, stop_after_batches: int | None = None) -> dict:
    """Extract one (model, variant, shots) file. ``stop_after_batches`` exists for the resume test."""
    from . import models

    out_h5 = ensure_writable(out_h5)
    if out_json is not None:
        ensure_writable(out_json)
    cfg.validate()
    rows = rows.sort_values("question_id").reset_index(drop=True)
    P.check_shots(pool, rows.subject.unique(), cfg.shots)       # before any model is loaded
    texts = P.build_prompts(rows, pool, cfg.shots, cfg.shot_order, cfg.shot_seed)
    if threads:
        torch.set_num_threads(int(threads))
    device = models.pick_device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    if model is None:
        tok, model = models.load(card["path"], dtype=dtype, device=device,
                                 trust_remote_code=card.get("trust_remote_code", False), device_map=cfg.device_map,
                                 max_memory=cfg.max_memory, offload_folder=cfg.offload_folder,
                                 adapter=card.get("adapter"))
    capture = LastTokenCapture(model, cfg.site)
    d = int(model.config.hidden_size)
    n = len(rows)
    qids = rows.question_id.to_numpy(np.int64)
    fp = fingerprint(card["checksum"], qids, cfg, seed)
    token_ids = tokenize(tok, texts)
    partial = out_h5.with_name(out_h5.name + ".partial")
    f = _open_partial(partial, fp, capture.n_layers, n, d, cfg.store_dtype)
    done = f["done"][:]
    t0, n_tok, n_batches = time.time(), 0, 0
    from tqdm import tqdm

    bar = tqdm(total=n, initial=int(done.sum()), unit="q", desc=f"{card.get('variant', '?')} {cfg.shots}-shot",
               mininterval=1.0 if os.isatty(2) else 15.0)
    try:
        for res in run_batches(model, tok, token_ids, rows.subject.tolist() if cfg.shares_prefix else None,
                               token_budget=cfg.token_budget, max_batch=cfg.max_batch, capture=capture, skip=done):
            order = np.argsort(res.positions)
            pos = res.positions[order]
            f["hidden"][:, pos, :] = res.states[:, order, :].numpy().astype(cfg.store_dtype)
            f["letter_logits"][pos] = res.letter_logits[order]
            f["n_tokens"][pos] = [len(token_ids[i]) for i in pos]
            done[pos] = True
            f["done"][pos] = True
            f.flush()
            n_tok += res.n_new_tokens
            n_batches += 1
            bar.update(len(pos))
            bar.set_postfix(tok_s=f"{n_tok / max(time.time() - t0, 1e-9):.0f}")
            if stop_after_batches is not None and n_batches >= stop_after_batches:
                raise KeyboardInterrupt(f"stopped after {n_batches} batches (test hook)")
    finally:
        bar.close()
        capture.remove()
    if not done.all():
        f.close()
        raise ExtractError(f"{int((~done).sum())} questions were not processed")

    logits = f["letter_logits"][:]
    pred = logits[:, 0].argmax(-1).astype(np.int8)
    pred_ns = logits[:, 1].argmax(-1).astype(np.int8)
    answer = rows.answer.to_numpy(np.int8)
    str_dt = h5py.string_dtype("utf-8")
    for name, arr, dt in (("question_id", qids, None), ("subject", rows.subject.astype(str).to_numpy(), str_dt),
                          ("answer", answer, None), ("pred", pred, None), ("pred_nospace", pred_ns, None),
                          ("layer_name", np.array(capture.names), str_dt)):
        if name in f:
            del f[name]
        f.create_dataset(name, data=arr.astype(object) if dt is not None else arr, dtype=dt)
    del f["done"]
    versions = package_versions()
    f.attrs.update(dict(model=card.get("model", ""), variant=card.get("variant", ""), model_path=str(card["path"]),
                        adapter=str(card.get("adapter") or ""),
                        checksum=card["checksum"], site=cfg.site, shots=cfg.shots, shot_order=cfg.shot_order,
                        shot_seed=cfg.shot_seed, dtype=str(dtype).replace("torch.", ""), store_dtype=cfg.store_dtype,
                        template_hash=P.template_hash(), seed=seed, prefix_sharing=bool(cfg.shares_prefix),
                        versions=json.dumps(versions)))
    f.attrs["complete"] = True  # written last: a file without it was cut short
    f.close()
    acc = accuracy_table(rows.subject.to_numpy(), answer, pred, pred_ns)
    acc.update(model=card.get("model"), variant=card.get("variant"), shots=cfg.shots, n_questions=n,
               seconds=round(time.time() - t0, 2), new_tokens=n_tok, device=device,
               dtype=str(dtype).replace("torch.", ""), versions=versions)
    if out_json is not None:
        write_json(out_json, acc)
    os.replace(partial, out_h5)
    log.info("%s: %d questions, accuracy %.3f (no-space %.3f)", out_h5, n, acc["accuracy"], acc["accuracy_nospace"])
    return acc


def accuracy_table(subjects: np.ndarray, answer: np.ndarray, pred: np.ndarray, pred_nospace: np.ndarray) -> dict:
    df = pd.DataFrame(dict(subject=subjects, ok=pred == answer, ok_ns=pred_nospace == answer))
    per = df.groupby("subject").agg(n=("ok", "size"), accuracy=("ok", "mean"), accuracy_nospace=("ok_ns", "mean"))
    return dict(accuracy=float(df.ok.mean()), accuracy_nospace=float(df.ok_ns.mean()),
                accuracy_macro=float(per.accuracy.mean()),
                per_subject={s: dict(n=int(r.n), accuracy=float(r.accuracy), accuracy_nospace=float(r.accuracy_nospace))
                             for s, r in per.iterrows()})


def letter_accuracy(model, tok, rows: pd.DataFrame, pool: pd.DataFrame, shots: int = 0, *, token_budget: int = 8192,
                    max_batch: int = 64) -> dict:
    """MMLU letter accuracy with the extraction's scoring, without storing states (fine-tuning evaluation)."""
    rows = rows.sort_values("question_id").reset_index(drop=True)
    texts = P.build_prompts(rows, pool, shots, "fixed")
    ids = tokenize(tok, texts)
    logits = np.zeros((len(rows), 2, 4), np.float32)
    for res in run_batches(model, tok, ids, rows.subject.tolist(), token_budget=token_budget, max_batch=max_batch,
                           capture=None):
        logits[res.positions] = res.letter_logits
    answer = rows.answer.to_numpy()
    return accuracy_table(rows.subject.to_numpy(), answer, logits[:, 0].argmax(-1), logits[:, 1].argmax(-1))


def read_states(path: str | Path, layer: int | None = None) -> dict:
    """Convenience reader: metadata plus all layers or one layer of ``hidden``."""
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in ("question_id", "answer", "pred") if k in f}
        out["subject"] = f["subject"].asstr()[:]
        out["attrs"] = dict(f.attrs)
        out["hidden"] = f["hidden"][layer] if layer is not None else f["hidden"][:]
    return out
