"""MMLU letter scoring, the same definition as extraction: the prediction is the argmax over the four
answer-letter logits at the last prompt token, for tokens " A".." D" (leading space: ``pred``, primary)
and "A".."D" (no space, Doimo et al.'s). 0-shot prompt = header + question block (``header: true``).
Accuracy overall and per subject. Self-contained until the shared scorer in ``llmscape.extract`` lands.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import LETTERS
from .data import prompt_text


class ScoringError(ValueError):
    pass


def letter_token_ids(tok) -> tuple[list[int], list[int]]:
    out = []
    for prefix in (" ", ""):
        ids = []
        for L in LETTERS:
            t = tok(prefix + L, add_special_tokens=False)["input_ids"]
            if len(t) != 1:
                raise ScoringError(f"the tokenizer splits {prefix + L!r} into {len(t)} tokens; letter scoring needs "
                                   "one token per answer letter.")
            ids.append(t[0])
        out.append(ids)
    return out[0], out[1]


@torch.no_grad()
def score(model, tok, rows, header: bool = True, batch_size: int = 16, device=None) -> dict:
    """Accuracy of ``model`` on ``rows`` (columns subject, question, choices, answer)."""
    device = device or next(model.parameters()).device
    space, nospace = letter_token_ids(tok)
    ids_all = [tok(prompt_text(r.subject, r.question, r.choices, header))["input_ids"] for r in rows.itertuples()]
    order = np.argsort([len(x) for x in ids_all], kind="stable")
    pred = np.zeros(len(rows), np.int64)
    pred_ns = np.zeros(len(rows), np.int64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        L = max(len(ids_all[i]) for i in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        last = torch.zeros(len(chunk), dtype=torch.long)
        for j, i in enumerate(chunk):
            n = len(ids_all[i])
            ids[j, :n] = torch.tensor(ids_all[i])
            mask[j, :n] = 1
            last[j] = n - 1
        keep = torch.unique(last)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits
        at = logits[torch.arange(len(chunk)), torch.searchsorted(keep, last).to(device)].float()
        pred[chunk] = at[:, space].argmax(-1).cpu().numpy()
        pred_ns[chunk] = at[:, nospace].argmax(-1).cpu().numpy()
    model.train(was_training)
    answer = rows["answer"].to_numpy()
    correct = pred == answer
    per_subject = {s: float(correct[(rows.subject == s).to_numpy()].mean()) for s in sorted(rows.subject.unique())}
    return dict(accuracy=float(correct.mean()) if len(rows) else float("nan"),
                accuracy_nospace=float((pred_ns == answer).mean()) if len(rows) else float("nan"),
                per_subject=per_subject, n=int(len(rows)), header=bool(header))
