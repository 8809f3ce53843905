"""NAT-traversal settings and the relay limits they imply (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from libp2p.relay.circuit_v2.resources import RelayLimits

REACHABILITY_MODES = ("auto", "public", "private")
RELAY_SERVICE_MODES = ("auto", "on", "off")
ON_OFF = ("on", "off")


class NatConfigError(ValueError):
    """A NAT setting is out of range; the message names it."""


@dataclass(frozen=True)
class RelayLimitsConfig:
    """What one relay grants: reservations it holds, and how long / how much each circuit may carry."""

    max_reservations: int = 64
    reservation_ttl_s: int = 3600
    max_circuit_duration_s: int = 3600
    max_circuit_bytes: int = 256 * 1024 * 1024
    max_circuits_per_peer: int = 8

    def validate(self) -> RelayLimitsConfig:
        for name in ("max_reservations", "reservation_ttl_s", "max_circuit_duration_s", "max_circuit_bytes",
                     "max_circuits_per_peer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NatConfigError(f"relay limit {name} must be a positive integer, not {value!r}")
        if self.reservation_ttl_s < 10:
            raise NatConfigError("relay limit reservation_ttl_s must be at least 10 s (renewals need time)")
        return self

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(
            duration=self.max_circuit_duration_s,
            data=self.max_circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


@dataclass(frozen=True)
class NatConfig:
    reachability: str = "auto"  # auto (AutoNAT decides), public, private
    relay_service: str = "auto"  # auto: serve as a relay once AutoNAT says public; on; off
    relays: tuple[str, ...] = ()  # relays to reserve on besides bootstrap peers offering the service
    max_relays: int = 2  # reservations a private node holds at once
    hole_punch: str = "on"
    autonat_interval_s: float = 300.0
    limits: RelayLimitsConfig = field(default_factory=RelayLimitsConfig)

    def validate(self) -> NatConfig:
        if self.reachability not in REACHABILITY_MODES:
            raise NatConfigError(f"reachability must be one of {', '.join(REACHABILITY_MODES)}")
        if self.relay_service not in RELAY_SERVICE_MODES:
            raise NatConfigError(f"relay_service must be one of {', '.join(RELAY_SERVICE_MODES)}")
        if self.hole_punch not in ON_OFF:
            raise NatConfigError("hole_punch must be on or off")
        if self.max_relays < 0:
            raise NatConfigError("max_relays must not be negative")
        if self.autonat_interval_s <= 0:
            raise NatConfigError("autonat_interval_s must be positive")
        self.limits.validate()
        return self
