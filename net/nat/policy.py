"""Pure NAT-traversal policy: no sockets, no clocks of its own (callers pass `now`).

- `ReachabilityTracker`: AutoNAT dial-back votes -> public / private / unknown.
- `ReservationBook`: which relays to (re)reserve on and when, renewing before expiry.
- `PunchScheduler`: when to retry hole punching a relayed peer, with backoff.
- `connection_kind`: direct / relayed / hole-punched for one connection.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

PUBLIC = "public"
PRIVATE = "private"
UNKNOWN = "unknown"

# AutoNAT dial-back outcomes as the client sees them.
DIAL_OK = "ok"  # the server reached us on a fresh connection
DIAL_ERROR = "error"  # the server tried and failed: a vote for private
DIAL_REFUSED = "refused"  # the server would not try (relayed, no usable address): no vote


@dataclass
class _Vote:
    outcome: str
    at: float


@dataclass
class ReachabilityTracker:
    """AutoNAT verdicts from distinct servers decide the node's reachability.

    Each server's latest verdict counts once; verdicts older than `max_age_s`
    are dropped. The status flips only when `confirmations` servers agree,
    capped at the number of servers that voted so that a node that knows one
    server (a home node with one bootstrap peer) still gets an answer.
    `forced` (public/private) overrides the votes: the operator knows best.
    """

    confirmations: int = 3
    max_age_s: float = 1800.0
    forced: str | None = None
    status: str = UNKNOWN
    votes: dict[str, _Vote] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        if self.forced not in (None, PUBLIC, PRIVATE):
            raise ValueError(f"forced reachability must be public or private, not {self.forced!r}")
        if self.forced:
            self.status = self.forced

    def record(self, server: str, outcome: str, now: float) -> str:
        """Count one server's verdict; returns the (possibly new) status."""
        if outcome not in (DIAL_OK, DIAL_ERROR, DIAL_REFUSED):
            raise ValueError(f"unknown AutoNAT outcome {outcome!r}")
        if outcome == DIAL_REFUSED:
            self.votes.pop(server, None)
        else:
            self.votes[server] = _Vote(outcome, now)
        return self.decide(now)

    def decide(self, now: float) -> str:
        self.votes = {s: v for s, v in self.votes.items() if now - v.at <= self.max_age_s}
        if self.forced:
            self.status = self.forced
            return self.status
        ok = sum(1 for v in self.votes.values() if v.outcome == DIAL_OK)
        failed = len(self.votes) - ok
        if not self.votes:
            self.status = UNKNOWN
            return self.status
        needed = min(self.confirmations, len(self.votes))
        if ok >= needed:
            self.status = PUBLIC
        elif failed >= needed:
            self.status = PRIVATE
        # else: the servers disagree; keep the last status until they agree
        return self.status

    def counts(self) -> dict[str, int]:
        ok = sum(1 for v in self.votes.values() if v.outcome == DIAL_OK)
        return {"ok": ok, "error": len(self.votes) - ok}


@dataclass
class Reservation:
    relay: str
    relay_addr: str | None = None
    state: str = "pending"  # pending, active, failed
    expires_at: float = 0.0
    next_at: float = 0.0
    failures: int = 0
    last_error: str | None = None
    renewals: int = 0


@dataclass
class ReservationBook:
    """Reservations on relays: when to reserve, renew and retry.

    A reservation is renewed when `renew_fraction` of its lifetime has passed,
    and never later than `min_margin_s` (at most a quarter of the lifetime)
    before it expires, so a slow or lost renewal still has time for retries. A failed attempt is retried with
    exponential backoff (with jitter so a fleet does not retry in step).
    """

    renew_fraction: float = 0.5
    min_margin_s: float = 30.0
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    entries: dict[str, Reservation] = field(default_factory=dict)

    def want(self, relay: str, relay_addr: str | None, now: float) -> None:
        """Start tracking `relay` (no-op if tracked); a reservation attempt is due at once."""
        if relay not in self.entries:
            self.entries[relay] = Reservation(relay, relay_addr, next_at=now)
        elif relay_addr:
            self.entries[relay].relay_addr = relay_addr

    def drop(self, relay: str) -> None:
        self.entries.pop(relay, None)

    def due(self, now: float) -> list[str]:
        """Relays whose reservation should be made or renewed now."""
        for entry in self.entries.values():
            if entry.state == "active" and now >= entry.expires_at:
                entry.state = "pending"  # expired without a successful renewal
        return sorted(r for r, e in self.entries.items() if now >= e.next_at)

    def reserved(self, relay: str, expires_at: float, now: float) -> float:
        """Record a successful (re)reservation; returns when to renew it."""
        entry = self.entries[relay]
        if entry.state == "active":
            entry.renewals += 1
        ttl = max(0.0, expires_at - now)
        margin = min(self.min_margin_s, ttl / 4)
        renew_in = min(ttl * self.renew_fraction, ttl - margin)
        entry.state, entry.expires_at, entry.next_at = "active", expires_at, now + renew_in
        entry.failures, entry.last_error = 0, None
        return entry.next_at

    def failed(self, relay: str, reason: str, now: float) -> float:
        """Record a failed attempt; returns when to retry. An unexpired reservation stays active."""
        entry = self.entries[relay]
        entry.failures += 1
        entry.last_error = reason
        ceiling = min(self.retry_max_s, self.retry_initial_s * 2 ** (entry.failures - 1))
        delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        if entry.state == "active" and now < entry.expires_at:
            delay = min(delay, max(0.5, (entry.expires_at - now) / 2))
        else:
            entry.state = "failed"
        entry.next_at = now + delay
        return entry.next_at

    def track(self, candidates: list[tuple[str, str | None]], max_relays: int, now: float) -> None:
        """Track candidate relays, in order, until `max_relays` of them are reserved or being
        reserved. A failed relay stays tracked (its backoff runs on) but does not count, so the
        next candidate is tried meanwhile; tracked relays get their latest address."""
        for relay, addr in candidates:
            if relay in self.entries:
                self.want(relay, addr, now)
                continue
            working = sum(1 for e in self.entries.values() if e.state != "failed")
            if working < max_relays:
                self.want(relay, addr, now)

    def active(self, now: float) -> list[Reservation]:
        return [e for e in self.entries.values() if e.state == "active" and now < e.expires_at]

    def next_wakeup(self, now: float, idle_s: float = 5.0) -> float:
        return min((e.next_at for e in self.entries.values()), default=now + idle_s)


def circuit_addr(relay_addr: str, relay: str, own_peer: str) -> str:
    """`<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`: how others reach us through `relay`."""
    base = relay_addr.split("/p2p/")[0].rstrip("/")
    return f"{base}/p2p/{relay}/p2p-circuit/p2p/{own_peer}"


@dataclass
class _PunchState:
    attempts: int = 0
    next_at: float = 0.0
    succeeded: bool = False


@dataclass
class PunchScheduler:
    """When to (re)try hole punching each peer we reach only through a relay.

    The first attempt waits `first_delay_s` (identify and the observed addresses
    settle); after a failure the next waits `retry_initial_s` doubling up to
    `retry_max_s`. A peer that loses its relayed connection is forgotten.
    """

    first_delay_s: float = 1.0
    retry_initial_s: float = 10.0
    retry_max_s: float = 600.0
    peers: dict[str, _PunchState] = field(default_factory=dict)

    def relayed(self, peer: str, now: float) -> None:
        if peer not in self.peers:
            self.peers[peer] = _PunchState(next_at=now + self.first_delay_s)

    def gone(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def due(self, now: float) -> list[str]:
        return sorted(p for p, s in self.peers.items() if not s.succeeded and now >= s.next_at)

    def next_due(self) -> float | None:
        """When the next attempt is due, or None while no peer waits for one."""
        return min((s.next_at for s in self.peers.values() if not s.succeeded), default=None)

    def result(self, peer: str, ok: bool, now: float) -> float | None:
        """Record an attempt; returns when to retry, or None after success."""
        state = self.peers.setdefault(peer, _PunchState())
        state.attempts += 1
        if ok:
            state.succeeded = True
            return None
        state.next_at = now + min(self.retry_max_s, self.retry_initial_s * 2 ** (state.attempts - 1))
        return state.next_at


def _ipv4(address: str) -> ipaddress.IPv4Address | None:
    parts = address.split("/")
    if len(parts) > 2 and parts[1] == "ip4":
        try:
            return ipaddress.IPv4Address(parts[2])
        except ValueError:
            return None
    return None


def worth_direct_dial(address: str, own_addresses: list[str]) -> bool:
    """Whether dialing a peer's announced address could reach it from here.

    A private (RFC 1918) or link-local IPv4 address is only worth a dial from the same /24
    as one of our own addresses: from another LAN it never answers and the dial waits out
    its timeout. Public, shared (100.64/10) and IPv6 addresses are always worth a try."""
    ip = _ipv4(address)
    if ip is None:
        return True  # IPv6 or a name: worth a try
    if ip.is_unspecified:
        return False
    if ip.is_loopback or not (ip.is_private or ip.is_link_local):
        return True
    network = ipaddress.IPv4Network(f"{ip}/24", strict=False)
    return any((own := _ipv4(a)) is not None and own in network for a in own_addresses)


def is_circuit(address: str) -> bool:
    return "/p2p-circuit" in address


def connection_kind(address: str, *, replaced_relay: bool = False) -> str:
    """direct, relayed, or hole-punched (a direct connection to a peer we had reached via a relay)."""
    if is_circuit(address):
        return "relayed"
    return "hole-punched" if replaced_relay else "direct"


def should_initiate_punch(own_peer: str, peer: str, relayed_inbound: bool | None) -> bool:
    """One side drives DCUtR: the one that accepted the relayed connection (as the spec has it);
    if the direction is unknown, the smaller peer id. Both driving at once makes sessions collide."""
    if relayed_inbound is not None:
        return relayed_inbound
    return own_peer < peer
