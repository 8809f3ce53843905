"""What the API and CLI show of the ledger: plain dicts of entries and profiles."""

from __future__ import annotations

from typing import Any

from knexa.crdt.entry import Entry
from knexa.crdt.namespace import Kind, kind_of
from knexa.crdt.profile import CapabilityProfile, ProfileError, profile_from_payload
from knexa.crdt.reputation import report_from_payload


def _value(entry: Entry) -> Any:
    if entry.deleted:
        return None
    try:
        kind = kind_of(entry.key)
        if kind == Kind.PROFILE:
            profile = profile_from_payload(entry.payload, allow_newer=True)
            return profile.to_dict() if profile is not None else None
        if kind == Kind.REPORT:
            return report_from_payload(entry.payload).to_dict()
        return entry.value()
    except (ProfileError, ValueError):
        return None


def entry_view(entry: Entry) -> dict[str, Any]:
    """Every entry in the state passed signature, namespace, clock and size checks."""
    return {
        "key": entry.key,
        "kind": str(kind_of(entry.key)),
        "author": entry.author,
        "clock": {"wall_ms": entry.wall_ms, "counter": entry.counter},
        "expires_at_ms": entry.expires_at_ms,
        "deleted": entry.deleted,
        "verified": True,
        "value": _value(entry),
    }


def profile_summary(profile: CapabilityProfile | None) -> dict[str, Any] | None:
    if profile is None:
        return None
    device = profile.device.backend + (f" ({profile.device.gpu_name})" if profile.device.gpu_name else "")
    return {
        "models": [m.name for m in profile.models],
        "device": device,
        "queue_length": profile.load.queue_length,
        "tokens_per_s": profile.throughput.tokens_per_s,
        "reachability": profile.reachability.status,
    }
