"""What a node's prefix-cache sharing may hold, announce and fetch. Kept apart from the service so that
reading a config file does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvShareSettings:
    store_bytes: int = 512 << 20  # the local store of prefilled caches, least recently used first out
    block: int = 64  # announce and look up prefixes at multiples of this many tokens
    max_blocks: int = 128  # announce at most this many prefixes per cache (8,192 tokens at 64)
    fetch: str = "auto"  # auto: by measured rates; always; never
    min_prefix_tokens: int = 64  # in auto mode, shorter shared prefixes are computed here
    lookup_timeout_s: float = 2.0  # per DHT lookup
    unmeasured_fetch_timeout_s: float = 30.0  # fetch deadline before any local prefill was measured
    max_fetch_bytes: int = 2 << 30  # a peer's cache larger than this is not fetched
    providers_tried: int = 3  # providers of a prefix tried before computing it here

    def validate(self) -> KvShareSettings:
        """Raises ValueError whose message starts with the name of the first setting out of range."""
        if self.fetch not in ("auto", "always", "never"):
            raise ValueError(f"fetch must be auto, always or never, not {self.fetch!r}")
        for name in ("store_bytes", "min_prefix_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0")
        for name in ("block", "max_blocks", "providers_tried", "max_fetch_bytes", "lookup_timeout_s",
                     "unmeasured_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        return self
