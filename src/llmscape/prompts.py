"""The MMLU prompt of lm-eval and of Doimo et al. (NeurIPS 2024).

    The following are multiple choice questions (with answers) about high school biology.\\n\\n
    <shot question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: B\\n\\n      (k times)
    <question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:                    (no trailing space)

Shot order: ``fixed`` takes the first k pool items in pool order (lm-eval's ``first_n``);
``permuted`` permutes those k items per question with ``numpy.random.default_rng([seed, question_id])``,
so a question's prompt never depends on the number of workers or on which other questions are run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .data import LETTERS
from .errors import LlmscapeError

HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CHOICE = "{letter}. {text}\n"
ANSWER = "Answer:"
SHOT_END = " {letter}\n\n"
SHOT_ORDERS = ("fixed", "permuted")


class PromptError(LlmscapeError, ValueError):
    pass


def template_hash() -> str:
    """Changes whenever the template text changes (recorded in every HDF5 file)."""
    return hashlib.sha256("\x1f".join([HEADER, CHOICE, ANSWER, SHOT_END]).encode()).hexdigest()[:16]


def header(subject: str) -> str:
    return HEADER.format(subject=subject.replace("_", " "))


def question_block(question: str, choices: Sequence[str]) -> str:
    body = question.strip() + "\n"
    body += "".join(CHOICE.format(letter=letter, text=str(c).strip())
                    for letter, c in zip(LETTERS, choices, strict=True))
    return body + ANSWER


def shot_block(question: str, choices: Sequence[str], answer: int) -> str:
    return question_block(question, choices) + SHOT_END.format(letter=LETTERS[int(answer)])


def shot_rows(pool: pd.DataFrame, subject: str, k: int, order: str, seed: int, question_id: int) -> pd.DataFrame:
    if order not in SHOT_ORDERS:
        raise PromptError(f"shot order {order!r} is not one of {SHOT_ORDERS}")
    return _pick_shots(pool[pool.subject == subject].sort_values("shot_rank"), subject, k, order, seed, question_id)


def _pick_shots(rows: pd.DataFrame, subject: str, k: int, order: str, seed: int, question_id: int) -> pd.DataFrame:
    """The k shots of one question from its subject's pool rows, already in ``shot_rank`` order."""
    if k > len(rows):
        raise PromptError(f"{k} shots asked for subject {subject!r}, but its few-shot pool holds {len(rows)}. "
                          f"Fix: use at most {len(rows)} shots (extract.shots) or a larger data.pool_size.")
    return rows.iloc[shot_positions(k, order, seed, question_id)]


def shot_positions(k: int, order: str, seed: int, question_id: int) -> list[int]:
    """Pool ranks of a question's k shots, in prompt order."""
    if order == "permuted" and k > 1:
        return [int(i) for i in np.random.default_rng([int(seed), int(question_id)]).permutation(k)]
    return list(range(k))


def prefix(subject: str, shots: pd.DataFrame) -> str:
    """Header plus shots: the part shared by all questions of a subject under ``fixed`` order."""
    return header(subject) + "".join(shot_block(r.question, r.choices, r.answer) for r in shots.itertuples())


def build_prompt(row, pool: pd.DataFrame, k: int, order: str = "fixed", seed: int = 42) -> str:
    shots = shot_rows(pool, row.subject, k, order, seed, row.question_id)
    return prefix(row.subject, shots) + question_block(row.question, row.choices)


def build_prompts(rows: pd.DataFrame, pool: pd.DataFrame, k: int, order: str = "fixed", seed: int = 42) -> list[str]:
    """:func:`build_prompt` of every row; the pool is split by subject once (the whole test set's
    prompts are built for token counts, not only for extraction)."""
    check_shots(pool, rows.subject.unique(), k)
    if order not in SHOT_ORDERS:
        raise PromptError(f"shot order {order!r} is not one of {SHOT_ORDERS}")
    blocks = {s: [shot_block(r.question, r.choices, r.answer) for r in g.sort_values("shot_rank").itertuples()]
              for s, g in pool.groupby("subject", sort=False)}
    out = []
    for r in rows.itertuples():
        shots = "".join(blocks[r.subject][i] for i in shot_positions(k, order, seed, r.question_id))
        out.append(header(r.subject) + shots + question_block(r.question, r.choices))
    return out


def check_shots(pool: pd.DataFrame, subjects, k: int) -> None:
    """Shots beyond the pool is an error, raised before any model is loaded."""
    if k < 0:
        raise PromptError(f"shots must be >= 0, got {k}")
    sizes = pool.groupby("subject").size()
    for s in subjects:
        have = int(sizes.get(s, 0))
        if k > have:
            raise PromptError(f"{k} shots asked, but the few-shot pool of subject {s!r} holds {have}. "
                              f"Fix: use at most {have} shots (extract.shots) or a larger data.pool_size.")
