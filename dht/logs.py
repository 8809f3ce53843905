"""Keep py-libp2p's per-stream DHT warnings out of the user's log.

py-libp2p's DHT server (logger ``libp2p.kad_dht.kad_dht``) logs
``Failed to read DHT message from stream: `` at WARNING every time a client
closes its request stream, i.e. after every DHT request. The libp2p logger has
no handler and does not propagate, so Python's last-resort handler prints it to
stderr. This filter drops exactly that message when the cause is an ordinary
stream close; any other warning still gets through.
"""

from __future__ import annotations

import logging

DHT_SERVER_LOGGER = "libp2p.kad_dht.kad_dht"
_NOISY_PREFIX = "Failed to read DHT message from stream"


class DhtStreamCloseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_NOISY_PREFIX):
            return True
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if exc is None or str(exc) == "":
            return False
        name = type(exc).__name__
        return not ("EOF" in name or "Closed" in name or "Reset" in name)


_FILTER = DhtStreamCloseFilter()


def quiet_dht_stream_noise() -> None:
    """Install the filter once (idempotent)."""
    logger = logging.getLogger(DHT_SERVER_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
