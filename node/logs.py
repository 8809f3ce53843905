"""One structured line per event: `time level logger event=... key=value`."""

from __future__ import annotations

import logging
import sys
import time

# py-libp2p logs expected, recovered conditions (a peer closing a stream, a
# dial race lost) at WARNING/ERROR; they are noise to a node operator.
_NOISY_LIBRARY_LOGGERS = ("libp2p", "multiaddr", "hypercorn.error", "hypercorn.access")


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if not message.startswith("event="):
            message = "event=log msg=" + _quote(message)
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():<7} {record.name} {message}"
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(text: str) -> str:
    text = text.replace("\n", " ")
    return '"' + text.replace('"', '\\"') + '"' if (" " in text or not text) else text


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    library_level = logging.DEBUG if level == "debug" else logging.CRITICAL
    for name in _NOISY_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
