"""What every rule entry point in scripts/ needs: its log file and the library on the path."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def start(smk, name: str) -> logging.Logger:
    """Send stderr (progress bars, warnings, tracebacks) and the `llmscape` logger to the rule's log."""
    if smk.log:
        Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(smk.log[0], "a", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(f"llmscape.{name}")
    log.info("rule %s, wildcards %s", smk.rule, dict(smk.wildcards))
    return log
