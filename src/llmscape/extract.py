"""Per-layer last-prompt-token representations of a causal LM on MMLU prompts, into HDF5.

What is kept, per question, at the last prompt token (the ``:`` of ``Answer:``):
  * ``site: norm`` (the paper's): the output of every decoder block's input RMSNorm (layers 0..L-1,
    i.e. the normalised residual stream entering block i) plus the final norm output (layer L);
  * ``site: residual``: the raw residual stream entering every block plus the last block's output.
  * the logits of the four answer letters, with a leading space (" A") and without ("A"), computed
    from the final hidden state and the matching lm_head rows only (no vocabulary-wide logits).

Speed: prompts are tokenised once, sorted by length and batched by a token
budget; forward hooks keep only the last position of each row; the decoder is run without the LM head.
Prefix sharing (``prefix_sharing: true``): a subject's prompts form a prefix tree on their *token ids*
(:func:`build_tree`; on ids, so BPE merges across shot/question boundaries cannot make it inexact).
With ``fixed`` shots it is the header and shots, shared by every question; with ``permuted`` shots the
header is shared by all, the first shot by the questions that start with it, and so on. Each shared
segment runs once, attending to its path's cache; the prompts' own ends run in token-budget batches
packed end to end into one row (no padding) behind their node's path, whose keys/values every segment
attends to without a copy per segment (:class:`_Pack`; padded rows for architectures it does not cover).
The tree is walked depth first, so only the caches of the current path (and of the inner nodes of
one batch per level) are alive: :func:`count_prompt_tokens` gives the tokens run and that peak.

HDF5 layout (``results/reps/{model}/{variant}/{shots}shot.h5``):
  hidden         (n_layers, n_questions, d)  float16|float32, chunked (1, <=256, d) with fletcher32 checksums
  question_id    (n,) int64, ascending (the analysis index order)
  subject        (n,) utf-8 str
  answer         (n,) int8 0..3         pred (n,) int8 0..3 (argmax of the " A".." D" logits)
  pred_nospace   (n,) int8 (argmax of the "A".."D" logits, Doimo's constrained prediction)
  letter_logits  (n, 2, 4) float32      [:, 0] = " A".." D", [:, 1] = "A".."D"
  n_tokens       (n,) int32              prompt length in tokens
  layer_name     (n_layers,) utf-8 str
  attrs: model, label, variant, model_path, adapter (a fine-tuned variant's, or empty), checksum, site, shots,
         shot_order, shot_seed, dtype, store_dtype, template_hash, seed, prefix_sharing, fingerprint, versions (JSON),
         complete (written last)

The file is written as ``<name>.partial`` and renamed when complete. A killed run resumes from its
last completed batch: rows are marked done after each batch, and a rerun with the same fingerprint
(model checksum, questions, prompt settings) skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from . import models, owner, prompts as P
from .data import LETTERS
from .errors import LlmscapeError
from .integrity import rebuild_hint, seal, verify
from .io import ensure_writable, package_versions, write_json
from .partitioned import gathered

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
    def from_dict(cls, d: dict, shots: int) -> ExtractConfig:
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
            raise ExtractError(f"extract.store_dtype {self.store_dtype!r}: h5py stores float16 or float32 "
                               "(no bfloat16)")
        if self.token_budget < 1 or self.max_batch < 1:
            raise ExtractError("extract.token_budget and extract.max_batch must be positive")

    @property
    def shares_prefix(self) -> bool:
        return self.prefix_sharing  # a prefix tree: fixed and permuted shots alike


#: the schema's ``extract:`` defaults (tests/test_defaults.py), also the defaults of the counting helpers below
DEFAULTS = ExtractConfig()


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
                raise ExtractError(f"tokenizer splits {fmt.format(letter)!r} into {ids}; letter scoring needs one "
                                   "token")
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
    always leaving at least one token per prompt to run (the top of each group's prefix tree)."""
    if keys is None:
        return [Group([], list(range(len(token_ids))), [list(t) for t in token_ids])]
    out = []
    for members in _members_by_key(keys, len(token_ids)):
        seqs = [token_ids[i] for i in members]
        n = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
        out.append(Group(list(seqs[0][:n]), members, [list(s[n:]) for s in seqs]))
    return out


def _members_by_key(keys: Sequence, n: int) -> list[list[int]]:
    if len(keys) != n:
        raise ExtractError(f"{len(keys)} group keys for {n} prompts; give one key (the subject) per prompt")
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


MIN_SHARED = 16  # tokens: a shared segment shorter than this (below a group's top) is run once per child


@dataclass
class Node:
    """A node of a group's prefix tree. ``segment``: the token ids it adds to its parent's path. A leaf
    (``prompt`` set) ends that prompt and always holds at least its last token; an inner node (with
    ``children``) is run once and its keys/values serve every prompt below it."""
    segment: list[int]
    prompt: int | None = None
    children: list[Node] = field(default_factory=list)


def build_tree(token_ids: Sequence[Sequence[int]], members: Sequence[int], min_shared: int = MIN_SHARED) -> Node:
    """Prefix tree of the prompts ``members`` (positions into ``token_ids``) under an empty root: a radix
    tree on token ids, so BPE merges across shot/question boundaries cannot make it inexact. Inner
    segments shorter than ``min_shared`` tokens (a shared "Which of the following") are handed down to
    each child instead: a separate, smaller batch would cost more than the few tokens it saves."""
    root = Node([])
    root.children = _children(token_ids, list(members), 0, min_shared)
    return root


def _children(token_ids, members: list[int], start: int, min_shared: int) -> list[Node]:
    parts: dict[int, list[int]] = {}
    for i in members:
        parts.setdefault(token_ids[i][start], []).append(i)
    out = []
    for part in parts.values():
        rest = [token_ids[i][start:] for i in part]
        n = min(common_prefix_len(rest), min(map(len, rest)) - 1) if len(part) > 1 else 0
        if n == 0:  # one prompt, or one that ends where the others go on: leaves
            out.extend(Node(list(r), prompt=i) for i, r in zip(part, rest, strict=True))
            continue
        kids = _children(token_ids, part, start + n, min_shared)
        if n < min_shared and start > 0:
            for k in kids:
                k.segment = list(rest[0][:n]) + k.segment
            out.extend(kids)
        else:
            out.append(Node(list(rest[0][:n]), children=kids))
    return out


def group_trees(token_ids: Sequence[Sequence[int]], keys: Sequence | None, skip: np.ndarray | None = None,
                min_shared: int = MIN_SHARED) -> list[Node]:
    """One prefix tree per group (``keys``: one per prompt, the subject) of the prompts not in ``skip``;
    ``keys=None``: no sharing, one root whose children are all the prompts whole."""
    todo = [i for i in range(len(token_ids)) if skip is None or not skip[i]]
    if keys is None:
        return [Node([], children=[Node(list(token_ids[i]), prompt=i) for i in todo])] if todo else []
    out = []
    for members in _members_by_key(keys, len(token_ids)):
        members = [i for i in members if skip is None or not skip[i]]
        if members:
            out.append(build_tree(token_ids, members, min_shared))
    return out


def tree_tokens(node: Node) -> int:
    """Tokens a forward pass over the tree computes: every segment once."""
    return len(node.segment) + sum(tree_tokens(c) for c in node.children)


def held_tokens(node: Node, token_budget: int = DEFAULTS.token_budget, max_batch: int = DEFAULTS.max_batch,
                held: int = 0, path_len: int = 0) -> int:
    """Peak number of cached tokens alive while :func:`run_batches` walks the tree: the segments of the
    current path plus, at each level, those of the inner nodes of the batch being walked into (so at
    most one batch's tokens per level). Times 2 x layers x kv_heads x head_dim x bytes per value (128
    KiB per token for Llama-3-8B in bf16), this is the memory the caches hold."""
    peak = held
    lengths = [len(c.segment) for c in node.children]
    for batch in plan_batches(lengths, path_len, token_budget, max_batch):
        inner = [node.children[j] for j in batch if node.children[j].children]
        total = held + sum(len(c.segment) for c in inner)
        peak = max(peak, total)
        for c in inner:
            peak = max(peak, held_tokens(c, token_budget, max_batch, total, path_len + len(c.segment)))
            total -= len(c.segment)
    return peak


def count_prompt_tokens(token_ids: Sequence[Sequence[int]], group_keys: Sequence | None, *,
                        token_budget: int = DEFAULTS.token_budget, max_batch: int = DEFAULTS.max_batch,
                        min_shared: int = MIN_SHARED) -> dict:
    """Prompt tokens a forward pass computes: ``plain``, every prompt whole; ``shared``, with the prefix
    trees of :func:`run_batches` (``group_keys``: one key per prompt, its subject; None = no sharing),
    each distinct inner segment once plus every prompt's own leaf. ``held_max``: the largest number of
    cached tokens alive at once (:func:`held_tokens`) with ``token_budget`` and ``max_batch`` of the
    ``extract`` config, for memory estimates."""
    trees = group_trees(token_ids, group_keys, min_shared=min_shared)
    held = max((held_tokens(t, token_budget, max_batch) for t in trees), default=0)
    return dict(plain=int(sum(map(len, token_ids))), shared=int(sum(map(tree_tokens, trees))), held_max=int(held))


def count_config_tokens(tok, rows: pd.DataFrame, pool: pd.DataFrame, shots: int,
                        shot_order: str = DEFAULTS.shot_order, shot_seed: int = DEFAULTS.shot_seed,
                        prefix_sharing: bool = DEFAULTS.prefix_sharing, token_budget: int = DEFAULTS.token_budget,
                        max_batch: int = DEFAULTS.max_batch) -> dict:
    """:func:`count_prompt_tokens` of the prompts an extraction builds: ``tok`` a Hugging Face tokenizer,
    ``rows`` the questions (columns subject, question_id, question, choices, answer), ``pool`` the
    few-shot pool, the rest as in the ``extract`` config. Returns dict(plain, shared, held_max, questions);
    ``shared`` equals ``plain`` without sharing."""
    rows = rows.sort_values("question_id").reset_index(drop=True)
    ids = tokenize(tok, P.build_prompts(rows, pool, shots, shot_order, shot_seed))
    out = count_prompt_tokens(ids, rows.subject.tolist() if prefix_sharing else None, token_budget=token_budget,
                              max_batch=max_batch)
    return dict(out, questions=len(rows))


def plan_batches(lengths: Sequence[int], path_len: int, token_budget: int, max_batch: int,
                 packed: bool = True) -> list[list[int]]:
    """Indices into ``lengths`` (the segments to run under one tree node), longest first, each batch
    within the budget. Packed (:class:`_Pack`): the batch's tokens, plus the cached path at 1/8 a token
    per segment (its attention scores), <= token_budget; padded: rows x (longest segment + path / 8)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batches, cur, cur_max, cur_sum = [], [], 0, 0
    for j in order:
        L = lengths[j]
        new_max, new_sum = max(cur_max, L), cur_sum + L
        rows = len(cur) + 1
        cost = new_sum + rows * (path_len // 8) if packed else rows * (new_max + path_len // 8)
        if cur and (cost > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur, new_max, new_sum = [], L, L
        cur.append(j)
        cur_max, cur_sum = new_max, new_sum
    if cur:
        batches.append(cur)
    return batches


# --------------------------------------------------------------------------- running

@dataclass
class BatchResult:
    positions: np.ndarray          # (B,) positions into the prompt list
    states: torch.Tensor | None    # (n_layers, B, d) float32 on CPU, or None without capture
    letter_logits: np.ndarray      # (B, 2, 4)
    n_new_tokens: int              # tokens run since the previous result (inner tree segments included)


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


class _PathLayer(DynamicLayer):
    """One block's cache for a batch run under a tree node. Attention sees the keys/values of the node's
    path (batch 1 each, expanded to the batch as views: never copied per row, never written) followed
    by the batch's own. Of these, only the rows of inner nodes are kept (``keep``: row -> segment
    length), as their children's path; the rest is freed with the block's attention."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], keep: dict[int, int]):
        super().__init__()
        self.path = (keys, values)
        self.length = sum(k.shape[-2] for k in keys)
        self.keep = keep
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, *args, **kwargs):
        self.new = {r: (key_states[r: r + 1, :, :n].clone(), value_states[r: r + 1, :, :n].clone())
                    for r, n in self.keep.items()}
        b = key_states.shape[0]
        keys = torch.cat([k.expand(b, -1, -1, -1) for k in self.path[0]] + [key_states], dim=-2)
        values = torch.cat([v.expand(b, -1, -1, -1) for v in self.path[1]] + [value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


PACKED = "llmscape_packed"  # the attention of a packed batch, registered with transformers' attention interface
PACKED_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # attention = projections, RoPE, causal softmax(q k^T) v


def packs(model) -> bool:
    """Whether ``model``'s batches can be packed (:class:`_Pack`): an architecture whose attention is plain
    causal attention behind transformers' attention interface, without a sliding window or soft-capping.
    Others run padded batches (:class:`_PathLayer`), whose attention sees the path copied per row."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return getattr(cfg, "model_type", None) in PACKED_TYPES and window is None


@dataclass
class _Pack:
    """One packed forward pass: a batch's segments laid end to end in one row (no padding), each attending
    to the node's path, one (keys, values) per block shared by every segment (never copied per segment),
    and causally to itself. ``keep``: the segments (inner nodes) whose own keys/values are kept, per block,
    in ``new``, as their children's path."""
    path: list                        # per block (keys, values), (1, kv_heads, path_len, head_dim); [] at a root
    bounds: list[tuple[int, int]]     # (start, length) of each segment in the row
    keep: list[int]
    new: dict = field(default_factory=dict)   # block -> {segment: (keys, values)}
    masks: dict = field(default_factory=dict)  # (length, group) -> additive causal mask


def _packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, llmscape_pack=None, **kw):
    """Attention of a packed batch (transformers' attention-interface signature; ``query`` (1, H, T, d),
    ``key``/``value`` (1, KV, T, d) of the row). Query heads are folded onto their key/value head (grouped
    query attention without repeating keys), so the scores against the shared path are one matrix product
    for all T queries; each segment's scores against its own keys are its own small product, causal. A
    softmax over both, as a plain forward pass over path + segment computes it."""
    pack, layer = llmscape_pack, module.layer_idx
    _, H, T, d = query.shape
    kv = key.shape[1]
    g = H // kv
    pack.new[layer] = {r: (key[:, :, o: o + n].clone(), value[:, :, o: o + n].clone())
                       for r, (o, n) in enumerate(pack.bounds) if r in pack.keep}
    q = query[0].view(kv, g, T, d).transpose(1, 2).reshape(kv, T * g, d)  # row t * g + j: head kv * g + j
    pk, pv = pack.path[layer] if pack.path else (None, None)
    s_path = torch.matmul(q, pk[0].transpose(1, 2)) * scaling if pk is not None else None
    out = torch.empty_like(q)
    for o, n in pack.bounds:
        rows = slice(o * g, (o + n) * g)
        s = torch.matmul(q[:, rows], key[0, :, o: o + n].transpose(1, 2)) * scaling + _causal(pack, n, g, q)
        if s_path is not None:
            s = torch.cat([s_path[:, rows], s], dim=-1)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o_ = torch.matmul(p[..., -n:], value[0, :, o: o + n])
        if pv is not None:
            o_ = o_.baddbmm_(p[..., :-n], pv[0])
        out[:, rows] = o_
    return out.view(kv, T, g, d).permute(1, 0, 2, 3).reshape(1, T, H, d), None


def _causal(pack: _Pack, n: int, g: int, like: torch.Tensor) -> torch.Tensor:
    """(n * g, n) additive mask: query row t * g + j sees the segment's keys 0..t."""
    if (n, g) not in pack.masks:
        t = torch.arange(n, device=like.device)
        m = torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill_(t[None, :] > t[:, None], float("-inf"))
        pack.masks[(n, g)] = m.repeat_interleave(g, dim=0)
    return pack.masks[(n, g)]


class _attention:
    """Context: ``dec`` computes its attention with ``name`` (a registered implementation) inside it."""

    def __init__(self, dec, name: str):
        from transformers import AttentionInterface

        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _packed_attention)
        self.config, self.name = dec.config, name

    def __enter__(self):
        self.before = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.before


def letter_rows(head, letters: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense copies of the LM head's rows (and bias entries) of the 8 letter tokens: (8, d), (8,) or None.
    Under DeepSpeed ZeRO-3 the head's weight is an empty slice outside a gather (a fine-tuning job's
    evaluation), so it is gathered for the copy; a no-op for every other model (see partitioned.py)."""
    bias = getattr(head, "bias", None)
    with gathered([head.weight, bias]):
        idx = torch.as_tensor(letters, device=head.weight.device).reshape(-1)
        w = head.weight[idx].detach().clone()
        b = bias[idx].detach().clone() if bias is not None else None
    return w, b


@dataclass
class _Walk:
    """What a depth-first walk over prefix trees needs: the decoder, the batching limits, the letter rows."""
    dec: object
    n_blocks: int
    device: object
    pad: int
    token_budget: int
    max_batch: int
    capture: LastTokenCapture | None
    w_letters: torch.Tensor
    b_letters: torch.Tensor | None
    packed: bool = False  # batches packed into one row (:class:`_Pack`), else padded (:class:`_PathLayer`)
    pending: int = 0  # tokens run since the last result

    def node(self, node: Node, path: list) -> Iterator[BatchResult]:
        """Run ``node``'s children under its path (a list of per-node caches: per block (keys, values)) in
        batches, yielding the leaves' results; after each batch, walk into the inner children it ran, one
        after the other: a cache lives until its subtree is done, and one batch's per level (held_tokens)."""
        kids = node.children
        path_len = sum(p[0][0].shape[-2] for p in path)
        run = self.forward_packed if self.packed else self.forward
        for batch in plan_batches([len(k.segment) for k in kids], path_len, self.token_budget, self.max_batch,
                                  self.packed):
            res, caches = run([kids[j] for j in batch], path, path_len)
            if res is not None:
                yield res
            for r in sorted(caches):
                yield from self.node(kids[batch[r]], path + [caches.pop(r)])

    def forward(self, nodes: list[Node], path: list, path_len: int) -> tuple[BatchResult | None, dict]:
        seqs = [n.segment for n in nodes]
        B, S = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, S), self.pad, dtype=torch.long)
        mask = torch.zeros((B, path_len + S), dtype=torch.long)
        mask[:, :path_len] = 1
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, path_len: path_len + len(s)] = 1
        last = torch.tensor([len(s) - 1 for s in seqs])
        leaves = [r for r, n in enumerate(nodes) if n.prompt is not None]
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=(path_len + torch.arange(S)).unsqueeze(0).expand(B, S).to(self.device))
        layers, keep = [], {r: len(s) for r, (s, n) in enumerate(zip(seqs, nodes, strict=True)) if n.children}
        if path or keep:
            layers = [_PathLayer([p[i][0] for p in path], [p[i][1] for p in path], keep) for i in range(self.n_blocks)]
            kwargs.update(past_key_values=Cache(layers=layers), use_cache=True)
        else:
            kwargs.update(use_cache=False)
        if self.capture is not None:
            self.capture.index = last if leaves else None
        h = self.dec(**kwargs).last_hidden_state  # on the last block's device when the model is sharded
        self.pending += sum(map(len, seqs))
        caches = {r: [layer.new[r] for layer in layers] for r in keep}
        if not leaves:
            return None, caches
        rows = torch.tensor(leaves)
        return self.result(h[rows.to(h.device), last[rows].to(h.device)], leaves, nodes, rows), caches

    def forward_packed(self, nodes: list[Node], path: list, path_len: int) -> tuple[BatchResult | None, dict]:
        """Run ``nodes``' segments packed into one row behind their shared ``path`` (:class:`_Pack`): no
        padding, and the path's keys/values joined once per batch (one row), never expanded to the batch."""
        lens = [len(n.segment) for n in nodes]
        starts = np.cumsum([0] + lens[:-1])
        ids = torch.tensor([t for n in nodes for t in n.segment]).unsqueeze(0)
        pos = torch.cat([torch.arange(path_len, path_len + n) for n in lens]).unsqueeze(0)
        leaves = [r for r, n in enumerate(nodes) if n.prompt is not None]
        ends = torch.as_tensor(starts + np.array(lens) - 1)[leaves]
        joined = [tuple(torch.cat([p[i][j] for p in path], dim=-2) if len(path) > 1 else path[0][i][j]
                        for j in (0, 1)) for i in range(self.n_blocks)] if path else []
        spans = list(zip(starts.tolist(), lens, strict=True))
        pack = _Pack(joined, spans, [r for r, n in enumerate(nodes) if n.children])
        if self.capture is not None:
            self.capture.index = ends if leaves else None
        with _attention(self.dec, PACKED):
            h = self.dec(input_ids=ids.to(self.device), position_ids=pos.to(self.device), use_cache=False,
                         llmscape_pack=pack).last_hidden_state
        self.pending += sum(lens)
        caches = {r: [pack.new[i][r] for i in range(self.n_blocks)] for r in pack.keep}
        if not leaves:
            return None, caches
        return self.result(h[0, ends.to(h.device)], leaves, nodes, None), caches

    def result(self, h_last, leaves: list[int], nodes: list[Node], rows: torch.Tensor | None) -> BatchResult:
        """Letter logits of the leaves' last states ``h_last``; the captured states, of the batch's ``rows``
        (the padded path captures every row) or as captured (the packed path captures the leaves only)."""
        logits = h_last.to(self.w_letters.device).float() @ self.w_letters.float().T
        if self.b_letters is not None:
            logits = logits + self.b_letters.float()
        states = None
        if self.capture is not None:
            states = self.capture.take().cpu()
            states = states[:, rows] if rows is not None else states
            self.capture.index = None
        res = BatchResult(np.array([nodes[r].prompt for r in leaves]), states,
                          logits.reshape(len(leaves), 2, 4).cpu().numpy(), self.pending)
        self.pending = 0
        return res


@torch.inference_mode()
def run_batches(model, tok, token_ids: list[list[int]], group_keys: Sequence | None, *, token_budget: int,
                max_batch: int, capture: LastTokenCapture | None, skip: np.ndarray | None = None,
                progress: Callable[[int, int], None] | None = None,
                packed: bool | None = None) -> Iterator[BatchResult]:
    """Run every prompt not in ``skip`` once; yield per-batch last-token states and letter logits.

    ``group_keys`` (one per prompt, the subject) groups prompts into prefix trees (:func:`build_tree`):
    each tree is walked depth first, every inner segment runs once with its path's cache, and a
    node's children (leaves and inner nodes alike) run in token-budget batches attending to that path.
    ``group_keys=None`` runs every prompt whole, without any cache. ``packed``: a batch's segments in one
    row behind one shared path (:class:`_Pack`), or padded rows (:class:`_PathLayer`); None: packed where
    the architecture allows it (:func:`packs`)."""
    dec, blocks, _ = decoder_parts(model)
    w_letters, b_letters = letter_rows(model.get_output_embeddings(), letter_token_ids(tok))
    walk = _Walk(dec, len(blocks), next(model.parameters()).device, _pad_id(tok), token_budget, max_batch, capture,
                 w_letters, b_letters, packs(model) if packed is None else packed)
    for tree in group_trees(token_ids, group_keys, skip):
        for res in walk.node(tree, []):
            yield res
            if progress:
                progress(len(res.positions), res.n_new_tokens)


def tokenize(tok, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in tok(list(texts), add_special_tokens=True)["input_ids"]]


# --------------------------------------------------------------------------- the rule

def fingerprint(checksum: str, question_ids: np.ndarray, cfg: ExtractConfig, seed: int) -> str:
    """What a partial file's rows depend on. ``prefix_sharing`` is in it (switching it starts over), the
    prefix tree is not: it changes no state beyond fp32 rounding (the tests hold it to a plain forward
    pass), so a file begun with common-prefix-only sharing, or none, may be finished with the tree."""
    h = hashlib.sha256()
    h.update(checksum.encode())
    h.update(np.ascontiguousarray(question_ids, dtype=np.int64).tobytes())
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("token_budget", "max_batch", "device")}
    h.update(json.dumps(dict(keep, seed=seed, template=P.template_hash()), sort_keys=True).encode())
    return h.hexdigest()[:24]


def _open_partial(path: Path, fp: str, n_layers: int, n: int, d: int, store_dtype: str) -> h5py.File | None:
    """The partial file, owned by this job (llmscape.owner: a second job for the same output waits for
    a live owner and names it); resumed when its rows were computed with the same settings (a dead
    owner's too), else begun anew. None when the job waited for found the output finished."""
    claim = owner.claim(path)
    if claim.waited and not path.exists() and _finished_with(path.with_name(path.name[: -len(".partial")]), fp):
        claim.release()
        return None
    if path.exists():
        try:
            f = h5py.File(path, "r+")
            if f.attrs.get("fingerprint") == fp and "done" in f and f["hidden"].shape == (n_layers, n, d):
                log.info("resuming %s: %d of %d questions already done", path, int(f["done"][:].sum()), n)
                claim.watch()
                return f
            f.close()
            log.warning("%s was written with other settings; starting over", path)
        except OSError as e:
            if "lock" in str(e).lower():  # held by a process that left no owner record: never deleted
                claim.release()
                raise ExtractError(f"{path} is locked by another process ({e}). Fix: end the process that "
                                   f"writes it (fuser -v {path}), then rerun; its finished rows are kept.") from None
            log.warning("%s is unreadable (%s); starting over", path, e)
        path.unlink()
    f = h5py.File(path, "w")
    f.attrs["fingerprint"] = fp
    # per-chunk checksums: a reader finds a flipped or overwritten chunk instead of computing on it
    f.create_dataset("hidden", shape=(n_layers, n, d), dtype=store_dtype, chunks=(1, min(n, 256), d), fletcher32=True)
    f.create_dataset("letter_logits", shape=(n, 2, 4), dtype="float32", chunks=(min(n, 4096), 2, 4), fletcher32=True)
    f.create_dataset("n_tokens", shape=(n,), dtype="int32")
    f.create_dataset("done", shape=(n,), dtype=bool, data=np.zeros(n, bool))
    claim.watch()
    return f


def _finished_with(out_h5: Path, fp: str) -> bool:
    """Whether ``out_h5`` is a complete extraction with fingerprint ``fp`` (written by the job waited for)."""
    try:
        with h5py.File(out_h5, "r") as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("fingerprint") == fp
    except OSError:
        return False


def _written_meanwhile(out_h5: Path, out_json: str | Path | None) -> dict:
    """The accuracy table of an output another job finished while this one waited for it."""
    log.info("%s was finished by the job this one waited for; nothing left to compute", out_h5)
    if out_json is not None and Path(out_json).exists():
        return json.loads(Path(out_json).read_text())
    with h5py.File(out_h5, "r") as f:
        return accuracy_table(f["subject"].asstr()[:], f["answer"][:], f["pred"][:], f["pred_nospace"][:])


def model_context(model, tok=None) -> int | None:
    """Positions the model was trained for (its config's max_position_embeddings or an older name of
    it), else the tokenizer's model_max_length when that is a real limit; None when neither says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tok, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 10**7 else None


def check_context(token_ids: Sequence[Sequence[int]], rows: pd.DataFrame, shots: int, context: int | None) -> None:
    """Refuse prompts longer than the model's context before the first batch: positions past it were
    never trained, so their states would be stored as if they meant something."""
    if context is None or not token_ids:
        return
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    over = lengths > context
    if not over.any():
        return
    i = int(lengths.argmax())
    raise ExtractError(f"{int(over.sum())} of {len(lengths)} prompts at {shots} shots are longer than the model's "
                       f"context of {context} tokens; the longest, question {int(rows.question_id.iloc[i])} "
                       f"({rows.subject.iloc[i]}), has {int(lengths[i])} tokens. States past the context would be "
                       f"stored as if meaningful. Fix: fewer shots (extract.shots, extract.variant_shots), or a "
                       f"model with a context of at least {int(lengths[i])} tokens.")


def check_finite(states: np.ndarray, logits: np.ndarray, computed: torch.Tensor, names: Sequence[str],
                 cfg: ExtractConfig, qids: np.ndarray, card: dict) -> None:
    """Stop an extraction whose batch holds NaN or inf, before it is written: ``states`` (layers, rows,
    d) as stored, ``logits`` the letter logits, ``computed`` the states before the cast to store_dtype.
    The message names the layers and the likely cause; the file is left without its completion mark."""
    bad = np.flatnonzero(~np.isfinite(states).reshape(len(states), -1).all(axis=1))
    bad_logits = not np.isfinite(logits).all()
    if not len(bad) and not bad_logits:
        return
    rows = np.flatnonzero(~np.isfinite(states).all(axis=(0, 2)) | ~np.isfinite(logits).reshape(len(qids), -1).all(1))
    where = (f"layers {', '.join(f'{int(i)} ({names[i]})' for i in bad[:6])}{' ...' if len(bad) > 6 else ''} "
             f"({len(bad)} of {len(states)})" if len(bad) else "no stored layer")
    what = f"non-finite values (NaN or inf) in {where}{' and in the letter logits' if bad_logits else ''}"
    ids = f"questions {qids[rows[:5]].tolist()}{' ...' if len(rows) > 5 else ''}"
    if len(bad) and not bad_logits and bool(torch.isfinite(computed).all()):
        cause = (f"the states are finite but exceed what extract.store_dtype = {cfg.store_dtype} holds "
                 f"(|x| up to {float(computed.abs().max()):.4g}). Fix: extract.store_dtype: float32")
    else:
        cause = (f"likely damaged weights (a few flipped bytes pass the quick header check). Fix: rerun with "
                 f"LLMSCAPE_VERIFY_WEIGHTS=1 (full weight verification against the card's checksum) and, if it "
                 f"fails, download or convert the model again (its folder: {card.get('path')})"
                 + ("; with extract.dtype float16 an overflow is possible too: use bfloat16 or float32"
                    if cfg.dtype == "float16" else ""))
    raise ExtractError(f"{what}, {ids}: nothing of this batch is stored and the file is not marked complete. "
                       f"Cause: {cause}.")


def load_model(card: dict, cfg: ExtractConfig):
    """(tokenizer, model) of a card for an extraction: on the GPUs planned from their free memory when
    sharded (checked before any weight is read), else on the configured device."""
    device = models.pick_device(cfg.device)
    placed = models.fit_on_gpus(card, cfg)
    return models.load(card["path"], dtype=models.pick_dtype(cfg.dtype, device), device=device,
                       trust_remote_code=card.get("trust_remote_code", False),
                       device_map=placed if placed is not None else cfg.device_map,
                       max_memory=None if placed is not None else cfg.max_memory,
                       offload_folder=cfg.offload_folder, adapter=card.get("adapter"))


def extract(card: dict, rows: pd.DataFrame, pool: pd.DataFrame, cfg: ExtractConfig, out_h5: str | Path,
            out_json: str | Path | None = None, *, seed: int = 42, threads: int | None = None,
            model=None, tok=None, stop_after_batches: int | None = None) -> dict:
    """Extract one (model, variant, shots) file: check the settings and build the prompts, load the model,
    open (or resume) the partial file, run the batches into it, finish and seal it, then write the
    accuracy table and rename the file into place. ``stop_after_batches`` exists for the resume test."""
    out_h5 = ensure_writable(out_h5)
    if out_json is not None:
        ensure_writable(out_json)
    rows, texts = _prompts(rows, pool, cfg)  # before any model is loaded
    if threads:
        torch.set_num_threads(int(threads))
    device = models.pick_device(cfg.device)
    dtype = str(models.pick_dtype(cfg.dtype, device)).replace("torch.", "")
    if model is None:
        tok, model = load_model(card, cfg)
    out = _open_output(card, rows, texts, cfg, out_h5, seed, model, tok)
    if out is None:  # another job wrote this very output while this one waited for it
        return _written_meanwhile(out_h5, out_json)
    t0 = time.time()
    n_tok = _run_into(out, model, tok, rows, cfg, card, stop_after_batches)
    versions = package_versions()
    answer, pred, pred_ns = _finish(out, rows, _file_attrs(card, cfg, seed, dtype, versions))
    acc = accuracy_table(rows.subject.to_numpy(), answer, pred, pred_ns)
    acc.update(model=card.get("model"), variant=card.get("variant"), shots=cfg.shots, n_questions=len(rows),
               seconds=round(time.time() - t0, 2), new_tokens=n_tok, device=device, dtype=dtype, versions=versions)
    if out_json is not None:
        write_json(out_json, acc)
    os.replace(out.partial, out_h5)
    log.info("%s: %d questions, accuracy %.3f (no-space %.3f)", out_h5, len(rows), acc["accuracy"],
             acc["accuracy_nospace"])
    return acc


def _prompts(rows: pd.DataFrame, pool: pd.DataFrame, cfg: ExtractConfig) -> tuple[pd.DataFrame, list[str]]:
    """(rows in question_id order, their prompts), after the settings and the few-shot pool are checked."""
    cfg.validate()
    rows = rows.sort_values("question_id").reset_index(drop=True)
    P.check_shots(pool, rows.subject.unique(), cfg.shots)
    return rows, P.build_prompts(rows, pool, cfg.shots, cfg.shot_order, cfg.shot_seed)


@dataclass
class _Output:
    """An extraction in progress: its partial file, the hooks that capture the states, the prompts' ids."""
    f: h5py.File
    partial: Path
    capture: LastTokenCapture
    qids: np.ndarray
    token_ids: list[list[int]]


def _open_output(card: dict, rows: pd.DataFrame, texts: list[str], cfg: ExtractConfig, out_h5: Path, seed: int,
                 model, tok) -> _Output | None:
    """Hook the model, tokenise the prompts, check them against its context (before any file or batch)
    and open (or resume) the partial file; None when the job waited for finished this output meanwhile."""
    capture = LastTokenCapture(model, cfg.site)
    qids = rows.question_id.to_numpy(np.int64)
    fp = fingerprint(card["checksum"], qids, cfg, seed)
    token_ids = tokenize(tok, texts)
    check_context(token_ids, rows, cfg.shots, model_context(model, tok))
    partial = out_h5.with_name(out_h5.name + ".partial")
    f = _open_partial(partial, fp, capture.n_layers, len(rows), int(model.config.hidden_size), cfg.store_dtype)
    if f is None:
        capture.remove()
        return None
    return _Output(f, partial, capture, qids, token_ids)


def _run_into(out: _Output, model, tok, rows: pd.DataFrame, cfg: ExtractConfig, card: dict,
              stop_after_batches: int | None) -> int:
    """Run every question not done yet, writing its rows after each batch; the number of new tokens run.
    A failed or stopped run closes the file unmarked as complete: its rows stay for a resume."""
    f, done = out.f, out.f["done"][:]
    t0, n_tok, n_batches = time.time(), 0, 0
    bar = tqdm(total=len(rows), initial=int(done.sum()), unit="q", desc=f"{card.get('variant', '?')} {cfg.shots}-shot",
               mininterval=1.0 if os.isatty(2) else 15.0)
    try:
        for res in run_batches(model, tok, out.token_ids, rows.subject.tolist() if cfg.shares_prefix else None,
                               token_budget=cfg.token_budget, max_batch=cfg.max_batch, capture=out.capture, skip=done):
            bar.update(_write_batch(out, res, done, cfg, card))
            n_tok += res.n_new_tokens
            n_batches += 1
            bar.set_postfix(tok_s=f"{n_tok / max(time.time() - t0, 1e-9):.0f}")
            if stop_after_batches is not None and n_batches >= stop_after_batches:
                raise KeyboardInterrupt(f"stopped after {n_batches} batches (test hook)")
    except BaseException:
        f.close()
        raise
    finally:
        bar.close()
        out.capture.remove()
    if not done.all():
        f.close()
        raise ExtractError(f"{int((~done).sum())} questions were not processed")
    return n_tok


def _write_batch(out: _Output, res: BatchResult, done: np.ndarray, cfg: ExtractConfig, card: dict) -> int:
    """Store one batch's states, letter logits and prompt lengths (checked finite first) and mark its
    questions done, in the file too; the number of questions written."""
    order = np.argsort(res.positions)
    pos = res.positions[order]
    with np.errstate(over="ignore"):  # an overflow of store_dtype is reported by check_finite
        states = res.states[:, order, :].numpy().astype(cfg.store_dtype)
    check_finite(states, res.letter_logits[order], res.states, out.capture.names, cfg, out.qids[pos], card)
    f = out.f
    f["hidden"][:, pos, :] = states
    f["letter_logits"][pos] = res.letter_logits[order]
    f["n_tokens"][pos] = [len(out.token_ids[i]) for i in pos]
    done[pos] = True
    f["done"][pos] = True
    f.flush()
    return len(pos)


def _file_attrs(card: dict, cfg: ExtractConfig, seed: int, dtype: str, versions: dict) -> dict:
    """The finished file's attributes: what was extracted, from which weights, with which settings."""
    return dict(model=card.get("model", ""), label=card.get("label") or card.get("model", ""),
                variant=card.get("variant", ""), model_path=str(card["path"]), adapter=str(card.get("adapter") or ""),
                checksum=card["checksum"], site=cfg.site, shots=cfg.shots, shot_order=cfg.shot_order,
                shot_seed=cfg.shot_seed, dtype=dtype, store_dtype=cfg.store_dtype, template_hash=P.template_hash(),
                seed=seed, prefix_sharing=bool(cfg.shares_prefix), versions=json.dumps(versions))


def _finish(out: _Output, rows: pd.DataFrame, attrs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the per-question datasets (the predictions from the stored letter logits) and ``attrs``, seal
    the file and mark it complete, last; (answer, pred, pred_nospace)."""
    f = out.f
    logits = f["letter_logits"][:]
    pred = logits[:, 0].argmax(-1).astype(np.int8)
    pred_ns = logits[:, 1].argmax(-1).astype(np.int8)
    answer = rows.answer.to_numpy(np.int8)
    str_dt = h5py.string_dtype("utf-8")
    for name, arr, dt in (("question_id", out.qids, None), ("subject", rows.subject.astype(str).to_numpy(), str_dt),
                          ("answer", answer, None), ("pred", pred, None), ("pred_nospace", pred_ns, None),
                          ("layer_name", np.array(out.capture.names), str_dt)):
        if name in f:
            del f[name]
        f.create_dataset(name, data=arr.astype(object) if dt is not None else arr, dtype=dt)
    del f["done"]
    f.attrs.update(attrs)
    seal(f)  # a checksum on every dataset but hidden (which has fletcher32 per chunk), checked on read
    f.attrs["complete"] = True  # written last: a file without it was cut short
    f.close()
    return answer, pred, pred_ns


def accuracy_table(subjects: np.ndarray, answer: np.ndarray, pred: np.ndarray, pred_nospace: np.ndarray) -> dict:
    df = pd.DataFrame(dict(subject=subjects, ok=pred == answer, ok_ns=pred_nospace == answer))
    per = df.groupby("subject").agg(n=("ok", "size"), accuracy=("ok", "mean"), accuracy_nospace=("ok_ns", "mean"))
    return dict(accuracy=float(df.ok.mean()), accuracy_nospace=float(df.ok_ns.mean()),
                accuracy_macro=float(per.accuracy.mean()),
                per_subject={s: dict(n=int(r.n), accuracy=float(r.accuracy), accuracy_nospace=float(r.accuracy_nospace))
                             for s, r in per.iterrows()})


def letter_accuracy(model, tok, rows: pd.DataFrame, pool: pd.DataFrame, shots: int = 0, *,
                    token_budget: int = DEFAULTS.token_budget, max_batch: int = DEFAULTS.max_batch) -> dict:
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
    """Convenience reader: metadata plus all layers or one layer of ``hidden``, of a complete extraction
    whose datasets match their checksums (llmscape.integrity; refused naming the rebuild command)."""
    with h5py.File(path, "r") as f:
        if not f.attrs.get("complete", False):
            raise ExtractError(f"{path} has no completion mark: its extraction was cut short. {rebuild_hint(path)}")
        verify(f, path, ExtractError)
        out = {k: f[k][:] for k in ("question_id", "answer", "pred") if k in f}
        out["subject"] = f["subject"].asstr()[:]
        out["attrs"] = dict(f.attrs)
        try:  # hidden's chunks are checked against their fletcher32 checksums as they are read
            out["hidden"] = f["hidden"][layer] if layer is not None else f["hidden"][:]
        except OSError as e:
            raise ExtractError(f"{path}: hidden cannot be read intact ({e}): the file is damaged. "
                               f"{rebuild_hint(path)}") from None
    return out
