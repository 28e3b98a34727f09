"""The one exception base of llmscape: every stage's error is an LlmscapeError (and keeps its older
ValueError or RuntimeError base), so a caller can catch all of llmscape's errors, which all name the
bad value and the fix, without catching Python's own; and the one spelling of the fix that reruns a
damaged file's job (:func:`rebuild_command`), which errors of every floor print."""

import os


class LlmscapeError(Exception):
    """Base of every error llmscape raises on purpose."""


def rebuild_command(path: str | os.PathLike) -> str:
    """The Snakemake command that reruns the one job writing ``path`` and nothing else: ``--force`` with the
    file as the target (``--forcerun <rule>`` would force every job of the rule and all that follows from
    them). Where one job writes several files (an extraction job per variant) that job is the one forced."""
    return f"snakemake --cores 1 --force {path}"
