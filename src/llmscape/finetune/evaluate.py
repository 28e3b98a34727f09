"""MMLU letter scoring of a model being fine-tuned: the extraction's own scorer
(:func:`llmscape.extract.run_batches`), so accuracy here and in ``results/reps/*.json`` are the same
definition: the argmax over the four answer-letter logits at the last prompt token, for tokens
" A".." D" (leading space: ``pred``, primary) and "A".."D" (no space, Doimo et al.'s). The 0-shot prompt
is header + question block (``header: true``) or the question block alone.
"""

from __future__ import annotations

import numpy as np
import torch

from ..extract import ExtractError, letter_token_ids, run_batches, tokenize
from .data import prompt_text

ScoringError = ExtractError  # a tokenizer that splits an answer letter is the same error as in extraction


@torch.no_grad()
def score(model, tok, rows, header: bool = True, batch_size: int = 16, device=None) -> dict:
    """Accuracy of ``model`` (plain or peft-wrapped) on ``rows`` (columns subject, question, choices, answer)."""
    letter_token_ids(tok)  # fail early, naming the letter, if the tokenizer splits one
    texts = [prompt_text(r.subject, r.question, r.choices, header) for r in rows.itertuples()]
    ids = tokenize(tok, texts)
    logits = np.zeros((len(rows), 2, 4), np.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.eval()
    try:
        for res in run_batches(base, tok, ids, rows.subject.tolist(), token_budget=max(batch_size, 1) * 512,
                               max_batch=max(batch_size, 1), capture=None):
            logits[res.positions] = res.letter_logits
    finally:
        model.train(was_training)
    pred, pred_ns = logits[:, 0].argmax(-1), logits[:, 1].argmax(-1)
    answer = rows["answer"].to_numpy()
    correct = pred == answer
    per_subject = {s: float(correct[(rows.subject == s).to_numpy()].mean()) for s in sorted(rows.subject.unique())}
    return dict(accuracy=float(correct.mean()) if len(rows) else float("nan"),
                accuracy_nospace=float((pred_ns == answer).mean()) if len(rows) else float("nan"),
                per_subject=per_subject, n=int(len(rows)), header=bool(header))
