"""One way to run a stage: logging, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

log = logging.getLogger("codex")


class UserError(Exception):
    """Bad params or bad input: reported as one line, exit status 2, nothing written."""


def setup_logging(level: str | None = None) -> None:
    """Plain text on a terminal, JSON lines when CODEX_LOG_JSON=1."""
    level = (level or os.environ.get("CODEX_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("CODEX_LOG_JSON") == "1":
        import json

        class _Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps({"t": round(r.created, 3), "level": r.levelname,
                                   "logger": r.name, "msg": r.getMessage()})

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[], object]) -> None:
    """Run a stage's main(): 0 on success, 2 on UserError, 130 on Ctrl-C, 1 with a traceback otherwise."""
    setup_logging()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: earlier outputs left in place", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        # Disk full, read-only output directory, permission denied: one clear line, not a traceback storm.
        import errno

        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            print(f"error: {e.strerror}: {e.filename or ''} (earlier outputs left in place)",
                  file=sys.stderr)
            sys.exit(2)
        traceback.print_exc()
        sys.exit(1)
