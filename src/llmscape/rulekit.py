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
TRACEBACK = "LLMSCAPE_TRACEBACK"


def clear_message(value: BaseException, outputs=()) -> str | None:
    """The error as the one line a user acts on, where there is one: an LlmscapeError's own message
    (it names the bad value and the fix), or the folder that is full or not writable (llmscape.io.no_room,
    for errors raised as OSError or as HDF5's text); None for anything else, whose traceback is needed."""
    from .errors import LlmscapeError
    from .io import no_room

    if isinstance(value, LlmscapeError):
        return str(value)
    return no_room(value, outputs)


def start(smk, name: str) -> logging.Logger:
    """Send stderr (progress bars, warnings, tracebacks) and the `llmscape` logger to the rule's log; an
    uncaught error ends the log with one line naming the rule and the error: only that line for
    llmscape's own errors and for a full disk or a folder that cannot be written (:func:`clear_message`),
    that line and the traceback for any other error (for every error with $LLMSCAPE_TRACEBACK set)."""
    if smk.log:
        Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(smk.log[0], "a", buffering=1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(f"llmscape.{name}")
    log.info("rule %s, wildcards %s", smk.rule, dict(smk.wildcards))

    said = set()  # h5py reports a failed HDF5 write through sys.excepthook too, before raising it

    def excepthook(kind, value, tb):
        line = clear_message(value, list(smk.output))
        if line and not os.environ.get(TRACEBACK):
            if line not in said:
                log.error("rule %s failed: %s", smk.rule, line)
            said.add(line)
            return
        log.error("rule %s failed: %s: %s", smk.rule, kind.__name__, value)
        sys.__excepthook__(kind, value, tb)

    def unraisablehook(info):  # the same write failing again while h5py frees its objects
        if info.exc_value is None or clear_message(info.exc_value, list(smk.output)) is None:
            sys.__unraisablehook__(info)

    sys.excepthook = excepthook
    sys.unraisablehook = unraisablehook
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
