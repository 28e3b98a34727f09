"""The one exception base of llmscape: every stage's error is an LlmscapeError (and keeps its older
ValueError or RuntimeError base), so a caller can catch all of llmscape's errors, which all name the
bad value and the fix, without catching Python's own."""


class LlmscapeError(Exception):
    """Base of every error llmscape raises on purpose."""
