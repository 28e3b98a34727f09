"""The exact MMLU prompt strings (lm-eval / Doimo template) and the shot orders."""
import pandas as pd
import pytest

from llmscape import prompts as P

POOL = pd.DataFrame(dict(
    subject=["high_school_biology"] * 3, shot_rank=[0, 1, 2], question_id=[0, 1, 2],
    question=["What is a cell? ", "Which is a base?", "DNA is?"],
    choices=[[" unit", "atom", "rock", "gas"], ["A", "T", "Q", "Z"], ["acid", "salt", "sugar", "fat"]],
    answer=[0, 1, 0], source="test-heldout"))
ROW = pd.DataFrame(dict(question_id=[10], subject=["high_school_biology"], question=["Mitochondria make?"],
                        choices=[["ATP", "DNA", "RNA", "fat"]], answer=[0])).iloc[0]


def test_zero_shot_prompt_is_exact():
    assert P.build_prompt(ROW, POOL, 0) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Mitochondria make?\nA. ATP\nB. DNA\nC. RNA\nD. fat\nAnswer:")


def test_two_shot_prompt_is_exact_and_ends_without_space():
    expected = (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is a cell?\nA. unit\nB. atom\nC. rock\nD. gas\nAnswer: A\n\n"
        "Which is a base?\nA. A\nB. T\nC. Q\nD. Z\nAnswer: B\n\n"
        "Mitochondria make?\nA. ATP\nB. DNA\nC. RNA\nD. fat\nAnswer:")
    assert P.build_prompt(ROW, POOL, 2) == expected
    assert not expected.endswith(" ")


def test_permuted_order_is_per_question_and_reproducible():
    a = P.build_prompt(ROW, POOL, 3, order="permuted", seed=42)
    assert a == P.build_prompt(ROW, POOL, 3, order="permuted", seed=42)
    # the same shots, possibly reordered; the question block is last
    for q in ("What is a cell?", "Which is a base?", "DNA is?"):
        assert a.count(q) == 1
    orders = {tuple(P.shot_rows(POOL, ROW.subject, 3, "permuted", 42, qid).shot_rank) for qid in range(40)}
    assert len(orders) > 1  # different questions get different permutations
    # fixed order is lm-eval's first-n
    assert list(P.shot_rows(POOL, ROW.subject, 3, "fixed", 42, 10).shot_rank) == [0, 1, 2]


def test_more_shots_than_the_pool_is_an_error():
    with pytest.raises(P.PromptError, match="4 shots asked.*holds 3"):
        P.build_prompts(pd.DataFrame([ROW]), POOL, 4)


def test_template_hash_is_stable():
    assert P.template_hash() == P.template_hash() and len(P.template_hash()) == 16
