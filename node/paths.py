"""Names of the files a daemon keeps in its data dir, and how small state files are written (cheap to
import for the CLI)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

TOKEN_FILE = "api.token"
STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"


def write_json_atomically(path: Path, value: Any, indent: int | None = None) -> None:
    """Replace `path` with `value` as JSON so that a reader (or a crash) never sees half a file. The scratch
    file is named per process and thread: writers of the same file never share one. Raises OSError."""
    scratch = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        scratch.write_text(json.dumps(value, indent=indent))
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
