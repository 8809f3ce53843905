"""Settings and errors of the Discovery service."""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.kad_dht.common import BUCKET_SIZE


class DiscoveryError(Exception):
    """A discovery operation could not be done (peer not found, dial failed...)."""


@dataclass
class DiscoveryConfig:
    alpha: int = 3  # queries in flight per lookup
    k: int = BUCKET_SIZE  # replication factor and lookup width (py-libp2p fixes 20)
    rpc_timeout: float = 5.0  # one request to one peer
    lookup_timeout: float = 15.0  # one whole lookup
    dial_timeout: float = 5.0
    identify_wait: float = 2.0  # how long a new connection waits for identify
    refresh_interval: float = 300.0  # routing-table refresh
    reannounce_interval: float = 3600.0  # provider records (py-libp2p keeps them 48 h)
    record_ttl: float = 3600.0  # default lifetime of a signed record
    republish_fraction: float = 0.5  # republish when this much of the ttl is left
    maintenance_tick: float = 5.0  # how often the republish/reannounce loop looks
    failure_ttl: float = 60.0  # a peer that failed a request is skipped this long
    announce_retry: float = 15.0  # re-announce this soon when some peers refused
