"""The gate every entry passes before it may enter the state.

An entry that fails here is never stored, so it never appears in a delta or a
digest and cannot spread through this node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from knexa.crdt.entry import Entry, unpack_payload
from knexa.crdt.namespace import Kind, owner_of
from knexa.crdt.profile import ProfileError, profile_from_payload
from knexa.crdt.reputation import ReportError, report_from_payload
from knexa.crdt.signing import AuthorKeyError, Verifier

MAX_INT64 = 2**63 - 1
MAX_ORSET_ELEMENT_CHARS = 1024


class RejectReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_NAMESPACE = "wrong_namespace"
    BAD_SIGNATURE = "bad_signature"
    FUTURE_CLOCK = "future_clock"
    TOO_LARGE = "too_large"
    INVALID_PAYLOAD = "invalid_payload"


@dataclass(frozen=True)
class Limits:
    max_clock_skew_ms: int = 60_000
    max_entry_bytes: int = 64 * 1024
    max_key_chars: int = 512


class EntryValidator:
    def __init__(self, limits: Limits, verifier: Verifier | None = None) -> None:
        self.limits = limits
        self.verifier = verifier or Verifier()

    def check(self, entry: Entry, now_ms: int) -> RejectReason | None:
        """The reason to reject `entry` at local time `now_ms`, or None to accept it."""
        return self.check_many([entry], now_ms)[0]

    def check_many(self, entries: Sequence[Entry], now_ms: int) -> list[RejectReason | None]:
        """`check` for a batch; signatures are verified together, after the cheap checks,
        so junk costs no signature verification."""
        reasons = [self.precheck(e, now_ms) for e in entries]
        unchecked = [e for e, r in zip(entries, reasons, strict=True) if r is None]
        verdicts = iter(self.verifier.are_authentic(unchecked))
        for i, entry in enumerate(entries):
            if reasons[i] is not None:
                continue
            if not next(verdicts):
                reasons[i] = RejectReason.BAD_SIGNATURE
            elif not entry.deleted and not payload_is_valid(entry):
                reasons[i] = RejectReason.INVALID_PAYLOAD
        return reasons

    def precheck(self, entry: Entry, now_ms: int) -> RejectReason | None:
        """Every check except the signature and the payload schema."""
        if not is_well_typed(entry) or len(entry.key) > self.limits.max_key_chars:
            return RejectReason.MALFORMED
        if entry.size > self.limits.max_entry_bytes:
            return RejectReason.TOO_LARGE
        if owner_of(entry.key) != entry.author:
            return RejectReason.WRONG_NAMESPACE
        if entry.wall_ms > now_ms + self.limits.max_clock_skew_ms:
            return RejectReason.FUTURE_CLOCK
        try:
            self.verifier.author_key(entry.author)
        except AuthorKeyError:
            return RejectReason.MALFORMED
        return None


def is_well_typed(entry: Entry) -> bool:
    return (
        type(entry.key) is str
        and type(entry.payload) is bytes
        and type(entry.wall_ms) is int
        and type(entry.counter) is int
        and type(entry.author) is str
        and type(entry.expires_at_ms) is int
        and type(entry.deleted) is bool
        and type(entry.signature) is bytes
        and 0 <= entry.wall_ms <= MAX_INT64
        and 0 <= entry.counter <= MAX_INT64
        and 0 <= entry.expires_at_ms <= MAX_INT64
    )


def payload_is_valid(entry: Entry) -> bool:
    """Known kinds must carry a payload their schema accepts.

    A profile from a newer schema version is accepted unparsed: rejecting it
    would stop older nodes relaying it and split the mesh during an upgrade.
    """
    try:
        kind = entry.key.split("/", 1)[0]
        if kind == Kind.PROFILE:
            profile_from_payload(entry.payload, allow_newer=True)
        elif kind == Kind.REPORT:
            report_from_payload(entry.payload)
        elif kind == Kind.LEARN:
            return is_learn_record(unpack_payload(entry.payload))
        elif not _is_orset_element(unpack_payload(entry.payload)):
            return False
    except (ProfileError, ReportError, ValueError, TypeError):
        return False
    return True


def _is_orset_element(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_ORSET_ELEMENT_CHARS


def is_learn_record(value: object) -> bool:
    """A learning record is a map with string keys; its meaning is checked by whoever reads it
    (knexa.node.learn), which ignores records it cannot parse."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)
