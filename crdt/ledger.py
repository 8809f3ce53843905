"""The capability ledger: signed CRDT state plus its gate, views and optional store.

Pure and synchronous. The network layer drives it: publish what the `put_*`
methods return and what `merge` accepted (the deltas), feed received batches
to `merge_message`, and run anti-entropy with `bucket_summary`, `digest` and
`missing_for` (see `knexa.crdt.digest` for the exchange).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from libp2p.crypto.keys import KeyPair

from knexa.crdt import codec, digest
from knexa.crdt.digest import BucketSummary, Digest
from knexa.crdt.entry import NEVER_EXPIRES, Entry, canonical_packb, unpack_payload
from knexa.crdt.hlc import HybridClock
from knexa.crdt.lww_map import LWWMap
from knexa.crdt.namespace import (
    Kind,
    learn_key,
    orset_key,
    orset_prefix,
    owner_of,
    profile_key,
    report_key,
)
from knexa.crdt.orset import ORSet
from knexa.crdt.profile import CapabilityProfile, profile_from_payload
from knexa.crdt.reputation import Report, Reputation, aggregate_reputation, report_from_payload
from knexa.crdt.signing import Signer, Verifier
from knexa.crdt.store import LedgerStore
from knexa.crdt.validation import EntryValidator, Limits, RejectReason, is_well_typed

# Every refresh (each TTL/3) reaches every node through several mesh peers, and a
# GossipSub message costs a Python node about 2 ms to send or receive: that traffic
# grows with the mesh, and at 120 s it was 4% of a core per daemon at 50 nodes.
# Changes (model, adapters, skills, reachability) are published when they happen.
DEFAULT_PROFILE_TTL_S = 300.0
DEFAULT_REPORT_TTL_S = 24 * 3600.0
# How long an expired entry is kept as a tombstone before `prune` forgets it.
DEFAULT_PRUNE_GRACE_S = 3600.0
UNDECODABLE = "undecodable"


@dataclass
class MergeResult:
    accepted: list[Entry] = field(default_factory=list)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    # valid, but this ledger already held the same or a newer version
    superseded: int = 0


@dataclass
class LedgerCounters:
    accepted: int = 0
    superseded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Ledger:
    def __init__(
        self,
        key_pair: KeyPair,
        store: LedgerStore | None = None,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self._signer = Signer(key_pair)
        self.peer_id = self._signer.author
        self._clock = clock
        self._hlc = HybridClock(self._now_ms)
        self._validator = EntryValidator(limits or Limits(), verifier)
        self._state = LWWMap()
        self._store = store
        self._parsed: dict[bytes, CapabilityProfile | Report | None] = {}
        self.counters = LedgerCounters()
        if store is not None:
            # Re-checked like remote input: the file may have been tampered with.
            self._merge(store.load(), persist=False)

    # -- local writes: each returns the delta to announce ----------------------------

    def put_profile(
        self, profile: CapabilityProfile, ttl_s: float = DEFAULT_PROFILE_TTL_S
    ) -> Entry:
        CapabilityProfile.from_dict(profile.to_dict())  # refuse to sign what peers would reject
        return self._write(profile_key(self.peer_id), profile.to_payload(), ttl_s)

    def retract_profile(self, ttl_s: float = DEFAULT_PROFILE_TTL_S) -> Entry:
        return self._write(profile_key(self.peer_id), b"", ttl_s, deleted=True)

    def put_report(
        self, subject: str, score: float, reason: str, ttl_s: float = DEFAULT_REPORT_TTL_S
    ) -> Entry:
        report = Report(score, reason)
        Report.from_dict(report.to_dict())
        return self._write(report_key(self.peer_id, subject), report.to_payload(), ttl_s)

    def orset_add(self, set_name: str, element: str, ttl_s: float | None = None) -> Entry:
        ts = self._hlc.now()
        tag = f"{ts.wall_ms:x}.{ts.counter:x}"
        return self._write(orset_key(set_name, self.peer_id, tag), canonical_packb(element), ttl_s)

    def orset_remove(self, set_name: str, element: str) -> list[Entry]:
        """Tombstone this node's own tags for `element`; other nodes' adds stay."""
        prefix = orset_key(set_name, self.peer_id, "")
        own_adds = [e for e in self._state.live(self._now_ms(), prefix) if e.value() == element]
        # The tombstone lives as long as the add would have: after that the add
        # is dead on every replica anyway, and the tombstone may be pruned.
        return [
            self._write(add.key, b"", None, deleted=True, expires_at_ms=add.expires_at_ms)
            for add in own_adds
        ]

    def put_learn(self, topic: str, record: dict[str, Any], ttl_s: float | None) -> Entry:
        """A learning record (membership, matchmaker state, reward) under this node's namespace."""
        return self._write(learn_key(self.peer_id, topic), canonical_packb(record), ttl_s)

    def retract_learn(self, topic: str, ttl_s: float) -> Entry:
        return self._write(learn_key(self.peer_id, topic), b"", ttl_s, deleted=True)

    # -- remote input -----------------------------------------------------------------

    def merge(self, entries: Iterable[Entry]) -> MergeResult:
        return self._merge(entries, persist=True)

    def merge_message(self, data: bytes) -> MergeResult:
        """Decode and merge one entries message; undecodable bytes change nothing."""
        try:
            entries = codec.decode_entries(data)
        except codec.CodecError:
            self.counters.rejected[UNDECODABLE] += 1
            return MergeResult(rejected_by_reason={UNDECODABLE: 1})
        return self.merge(entries)

    # -- anti-entropy -----------------------------------------------------------------

    def digest(self, buckets: frozenset[int] | None = None) -> Digest:
        return digest.digest_of(self._state, buckets)

    def bucket_summary(self) -> BucketSummary:
        return digest.bucket_summary(self._state)

    def missing_for(self, remote: Digest) -> list[Entry]:
        return digest.missing_for(self._state, remote)

    # -- views ------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return list(self._state)

    def entry(self, key: str) -> Entry | None:
        return self._state.get(key)

    def profiles(self, now: float | None = None) -> dict[str, CapabilityProfile]:
        """Live profiles by peer id; expired, retracted or newer-schema ones are absent."""
        out: dict[str, CapabilityProfile] = {}
        for e in self._state.live(self._ms(now), f"{Kind.PROFILE}/"):
            profile = self._parse(e)
            if isinstance(profile, CapabilityProfile):
                out[e.author] = profile
        return out

    def reports_about(self, subject: str, now: float | None = None) -> dict[str, Report]:
        suffix = f"/{subject}"
        return {
            e.author: report
            for e in self._state.live(self._ms(now), f"{Kind.REPORT}/")
            if e.key.endswith(suffix) and isinstance(report := self._parse(e), Report)
        }

    def reputation(self, subject: str, now: float | None = None) -> Reputation:
        return self.reputations([subject], now)[subject]

    def reputations(self, subjects: Iterable[str], now: float | None = None) -> dict[str, Reputation]:
        """Several subjects' reputations from one pass over the live reports (one pass per subject would
        cost peers x reports when ranking a whole mesh)."""
        reports: dict[str, dict[str, Report]] = {subject: {} for subject in subjects}
        for e in self._state.live(self._ms(now), f"{Kind.REPORT}/"):
            about = reports.get(e.key.rsplit("/", 1)[-1])
            if about is not None and isinstance(report := self._parse(e), Report):
                about[e.author] = report
        return {subject: aggregate_reputation(subject, about.items()) for subject, about in reports.items()}

    def learn_entries(self, topic: str, now: float | None = None) -> dict[str, Entry]:
        """Live learning entries of one topic, by author, undecoded (readers that poll can skip the versions
        they already parsed)."""
        suffix = f"/{topic}"
        return {e.author: e for e in self._state.live(self._ms(now), f"{Kind.LEARN}/") if e.key.endswith(suffix)}

    def learn_records(self, topic: str, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Live learning records of one topic, by author."""
        out: dict[str, dict[str, Any]] = {}
        for author, e in self.learn_entries(topic, now).items():
            record = unpack_payload(e.payload)
            if isinstance(record, dict):
                out[author] = record
        return out

    def orset(self, set_name: str, now: float | None = None) -> ORSet:
        prefix = orset_prefix(set_name)
        now_ms = self._ms(now)
        return ORSet.from_entries((e for e in self._state if e.key.startswith(prefix)), now_ms)

    def orset_members(self, set_name: str, now: float | None = None) -> frozenset[str]:
        return self.orset(set_name, now).elements()

    # -- housekeeping -----------------------------------------------------------------

    def prune(self, now: float | None = None, grace_s: float = DEFAULT_PRUNE_GRACE_S) -> int:
        dropped = self._state.prune(self._ms(now), int(grace_s * 1000))
        if dropped and self._store is not None:
            self._store.delete(dropped)
        return len(dropped)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- internals --------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _ms(self, now: float | None) -> int:
        return self._now_ms() if now is None else int(now * 1000)

    def _write(
        self,
        key: str,
        payload: bytes,
        ttl_s: float | None,
        deleted: bool = False,
        expires_at_ms: int | None = None,
    ) -> Entry:
        if owner_of(key) != self.peer_id:
            raise ValueError(f"cannot write {key!r}: not in this node's namespace")
        ts = self._hlc.now()
        if expires_at_ms is not None:
            expires = expires_at_ms
        elif ttl_s is None:
            expires = NEVER_EXPIRES
        else:
            expires = ts.wall_ms + max(1, int(ttl_s * 1000))
        entry = self._signer.sign(key, payload, ts, expires, deleted)
        if entry.size > self._validator.limits.max_entry_bytes:
            raise ValueError(f"entry of {entry.size} bytes exceeds the size limit")
        self._state.apply(entry)
        self.counters.accepted += 1
        if self._store is not None:
            self._store.save([entry])
        return entry

    def _merge(self, entries: Iterable[Entry], persist: bool) -> MergeResult:
        result = MergeResult()
        rejected: Counter[str] = Counter()
        candidates: list[Entry] = []
        for entry in entries:
            if not is_well_typed(entry):
                rejected[RejectReason.MALFORMED] += 1
                continue
            # Known versions are dropped before any check: under gossip most
            # input is duplicates, and they can never change the state.
            current = self._state.version_of(entry.key)
            if current is not None and entry.version <= current:
                result.superseded += 1
            else:
                candidates.append(entry)
        reasons = self._validator.check_many(candidates, self._now_ms())
        for entry, reason in zip(candidates, reasons, strict=True):
            if reason is not None:
                rejected[reason] += 1
            elif self._state.apply(entry):
                self._hlc.observe(entry.timestamp)
                result.accepted.append(entry)
            else:
                result.superseded += 1
        if persist and self._store is not None and result.accepted:
            self._store.save(result.accepted)
        result.rejected_by_reason = dict(rejected)
        self.counters.accepted += len(result.accepted)
        self.counters.superseded += result.superseded
        self.counters.rejected.update(rejected)
        return result

    def _parse(self, entry: Entry) -> CapabilityProfile | Report | None:
        parsed = self._parsed.get(entry.content_hash)
        if parsed is None and entry.content_hash not in self._parsed:
            if entry.key.startswith(f"{Kind.PROFILE}/"):
                parsed = profile_from_payload(entry.payload, allow_newer=True)
            else:
                parsed = report_from_payload(entry.payload)
            if len(self._parsed) > 2 * len(self._state) + 1024:
                self._parsed.clear()  # drop parses of superseded entries
            self._parsed[entry.content_hash] = parsed
        return parsed

