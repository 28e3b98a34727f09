"""What every rule entry point in scripts/ needs: its log file, its error as one clear line, and (on
request) a record of the software it imported."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path

# A folder: every job writes there which installed distributions it imported (tests check that each
# stage's environment file under envs/ provides them).
RECORD_IMPORTS = "LLMSCAPE_RECORD_IMPORTS"


def start(smk, name: str) -> logging.Logger:
    """Send stderr (progress bars, warnings, tracebacks) and the `llmscape` logger to the rule's log; an
    uncaught error ends the log with one line naming the rule and the error before its traceback."""
    if smk.log:
        Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(smk.log[0], "a", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(f"llmscape.{name}")
    log.info("rule %s, wildcards %s", smk.rule, dict(smk.wildcards))

    def excepthook(kind, value, tb):
        log.error("rule %s failed: %s: %s", smk.rule, kind.__name__, value)
        sys.__excepthook__(kind, value, tb)

    sys.excepthook = excepthook
    record_imports(smk.rule)
    return log


def imported_distributions() -> list[str]:
    """Installed distributions (pip names, lower case) whose modules this process has imported."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    tops = {m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names)
    return sorted({d.lower().replace("_", "-") for t in tops for d in owners.get(t, [])})


def record_imports(label: str) -> None:
    """With $LLMSCAPE_RECORD_IMPORTS set, write at exit ``<folder>/<label>-<pid>.json``: the
    distributions this process imported."""
    folder = os.environ.get(RECORD_IMPORTS)
    if not folder:
        return

    def write():
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = Path(folder) / f"{label}-{os.getpid()}.json"
        out.write_text(json.dumps({"rule": label, "distributions": imported_distributions()}))

    atexit.register(write)
