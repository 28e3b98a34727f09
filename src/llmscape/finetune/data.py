"""Answer-letter supervised fine-tuning examples (Doimo et al., NeurIPS 2024): prompt = [header +] question block
ending in "Answer:", target = " X" (space + letter), loss on the target tokens only.

Rows come from the project's data layer (``llmscape.data.load_prepared``), so any dataset prepared into
the same normalised table (columns subject, question, choices, answer) can be trained on by pointing
``finetune.data.dir`` at its folder. ``header`` chooses the published training prompt (no header, the
default) or the extraction prompt (with the subject header).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import prompts
from ..data import LETTERS, load_prepared, read_rows


def prompt_text(subject: str, question: str, choices, header: bool) -> str:
    return (prompts.header(subject) if header else "") + prompts.question_block(question, choices)


def load_rows(source: str | Path, split: str | Path):
    """Rows of a split of prepared data. ``source``: the folder prepare_data wrote, or its table file
    (``mmlu.parquet``); ``split``: a split name, or the path of its index file (``<split>_index.npy``), as a
    rule declares them."""
    source = Path(source)
    if source.suffix != ".parquet" and not str(split).endswith(".npy"):
        rows, _ = load_prepared(source, split=str(split))
        return rows
    table = source if source.suffix == ".parquet" else source / "mmlu.parquet"
    index = Path(split) if str(split).endswith(".npy") else table.parent / f"{split}_index.npy"
    return read_rows(table, index)


def split_validation(rows, val_rows: int, seed: int = 0):
    """(train, validation): ``val_rows`` rows drawn once with a fixed seed, the same for every run."""
    n = len(rows)
    k = min(int(val_rows), max(n - 1, 0))
    pick = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    mask = np.zeros(n, bool)
    mask[pick] = True
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


def encode(rows, tok, header: bool, max_length: int) -> list[dict]:
    """Per row: input ids (prompt + all but the last target token), the positions whose next-token logits
    predict the target tokens, and the target ids. Over-long prompts lose tokens from the left."""
    out = []
    for r in rows.itertuples():
        p = tok(prompt_text(r.subject, r.question, r.choices, header))["input_ids"]
        t = tok(" " + LETTERS[int(r.answer)], add_special_tokens=False)["input_ids"]
        ids = list(p) + list(t[:-1])
        cut = max(0, len(ids) - int(max_length))
        ids = ids[cut:]
        start = len(p) - 1 - cut
        out.append(dict(input_ids=ids, positions=[start + j for j in range(len(t))], targets=list(t),
                        subject=r.subject))
    return out


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(e["input_ids"]) for e in examples)
    T = max(len(e["targets"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n, t = len(e["input_ids"]), len(e["targets"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        pos[i, :t] = torch.tensor(e["positions"])
        tgt[i, :t] = torch.tensor(e["targets"])
    return dict(input_ids=ids, attention_mask=mask, positions=pos, targets=tgt)


def answer_logits(model, batch) -> torch.Tensor:
    """(B, T, V) logits at the target-predicting positions; only those positions reach the LM head."""
    valid = batch["targets"] != -100
    keep = torch.unique(batch["positions"][valid])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits
    idx = torch.searchsorted(keep, batch["positions"].clamp(min=0))
    idx = idx.clamp(max=keep.numel() - 1)
    return torch.gather(logits, 1, idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def answer_loss(model, batch) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the answer tokens of the batch, number of answer tokens)."""
    sel = answer_logits(model, batch)
    valid = batch["targets"] != -100
    loss = torch.nn.functional.cross_entropy(sel[valid].float(), batch["targets"][valid])
    return loss, int(valid.sum())


def batch_order(n: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of optimiser step ``step``: epochs are seeded permutations, concatenated. A pure function
    of (step, seed), so a resumed run sees exactly the batches the uninterrupted run would have."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([int(seed), epoch]).permutation(n)
        out.extend(perm[offset: offset + global_batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)
