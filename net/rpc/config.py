"""Protocol constants and service settings."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_ID = "/knexa/rpc/1.0.0"
# Credit every call starts with for client-stream items, known to both sides;
# the server grants the rest of its window when the call starts.
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 1 << 40


@dataclass(frozen=True)
class RpcConfig:
    max_message_size: int = 8 * 1024 * 1024  # frame payload, checked on the prefix
    skew_s: float = 30.0  # accepted clock difference for envelope timestamps
    max_concurrent_per_peer: int = 64  # server: calls in flight per remote peer
    max_streams_per_peer: int = 8  # server: inbound RPC streams per remote peer
    stream_window: int = 8 * 1024 * 1024  # per-call receive credit for streamed items
    # server: streamed request bytes received from one peer and not yet consumed
    # by handlers, across all its calls; a call that would exceed it is OVERLOADED
    max_buffered_per_peer: int = 64 * 1024 * 1024
    replay_cache_size: int = 100_000
    streams_per_peer: int = 1  # client: pool size of outbound streams per peer
    calls_per_stream: int = 256  # client: open another pooled stream beyond this
    cancel_grace_s: float = 1.0  # how long a cancel/close frame may take to write

    def __post_init__(self) -> None:
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1 KiB")
        if self.stream_window < INITIAL_WINDOW:
            raise ValueError(f"stream_window must be at least {INITIAL_WINDOW}")
        if self.max_concurrent_per_peer < 1 or self.streams_per_peer < 1:
            raise ValueError("limits must be positive")
