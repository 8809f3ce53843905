"""Tuning py-libp2p's yamux for RPC traffic, through the knobs it exposes.

py-libp2p 0.8.1's yamux sends a WINDOW_UPDATE after every read, so each small
RPC message costs a second frame (and Noise message, and socket write) in the
other direction, and a bulk transfer carries one update per 64 KiB frame. Two
supported knobs remove most of them without patching the library:

- a larger receive window, granted once per stream with the stream's own
  `send_window_update` (the yamux spec allows any window increase), so the
  window never runs short and updates are only needed in large batches;
- `PY_YAMUX_RELEASE_ON_READ=0`, the library's documented perf switch, so a read
  that leaves the window above its target does not release credit at once.

Memory stays bounded: the RPC reader drains each stream eagerly into per-call
queues that are bounded by the RPC layer's own credit.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

EXTRA_WINDOW = 16 * 1024 * 1024
_ENV = "PY_YAMUX_RELEASE_ON_READ"


def configure_process() -> None:
    """Turn off release-on-read unless the operator set the variable explicitly."""
    os.environ.setdefault(_ENV, "0")


async def widen_receive_window(muxed_stream: Any, extra: int = EXTRA_WINDOW) -> bool:
    """Grant the peer `extra` bytes of yamux window on this stream; False if not yamux."""
    if not (hasattr(muxed_stream, "recv_window") and hasattr(muxed_stream, "send_window_update")):
        return False
    try:
        muxed_stream.recv_window += extra
        await muxed_stream.send_window_update(extra)
    except Exception as exc:  # a closed stream: the caller finds out on its next read
        log.debug("rpc: could not widen the yamux window: %s", exc)
        return False
    return True
