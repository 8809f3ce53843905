"""Hostile input is rejected with a reason, counted, and leaves the ledger unchanged."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.crdt import codec
from knexa.crdt.entry import Entry
from knexa.crdt.ledger import UNDECODABLE, Ledger
from knexa.crdt.signing import PARALLEL_MIN_BATCH, Verifier
from knexa.crdt.validation import Limits, RejectReason

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import KEY_PAIRS, FakeClock, make_ledger, resign, sample_profile, state_of

ATTACKER = KEY_PAIRS[6]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def victim(clock: FakeClock) -> Ledger:
    """A ledger that already holds some honest state."""
    ledger = make_ledger(0, clock)
    honest = make_ledger(1, clock)
    ledger.merge([honest.put_profile(sample_profile()), honest.put_report(ledger.peer_id, 1, "")])
    return ledger


@pytest.fixture
def honest_entry(clock: FakeClock) -> Entry:
    return make_ledger(2, clock).put_profile(sample_profile(queue_length=3))


def assert_rejected(ledger: Ledger, entry: Entry, reason: RejectReason) -> None:
    before = state_of(ledger)
    counted_before = ledger.counters.rejected[reason]
    result = ledger.merge([entry])
    assert result.accepted == []
    assert result.rejected_by_reason == {reason: 1}
    assert ledger.counters.rejected[reason] == counted_before + 1
    assert state_of(ledger) == before
    # A rejected entry is not in the state, so it is in no digest or reply.
    assert entry not in ledger.missing_for(make_ledger(5, FakeClock()).digest())


def test_forged_signature_is_rejected(victim: Ledger, honest_entry: Entry) -> None:
    forged = dataclasses.replace(honest_entry, signature=bytes(64))
    assert_rejected(victim, forged, RejectReason.BAD_SIGNATURE)


def test_tampered_payload_is_rejected(victim: Ledger, honest_entry: Entry) -> None:
    other = sample_profile(queue_length=0).to_payload()
    tampered = Entry(
        honest_entry.key, other, honest_entry.wall_ms, honest_entry.counter, honest_entry.author,
        honest_entry.expires_at_ms, honest_entry.deleted, honest_entry.signature,
    )
    assert_rejected(victim, tampered, RejectReason.BAD_SIGNATURE)


def test_claiming_someone_elses_authorship_is_rejected(
    victim: Ledger, honest_entry: Entry
) -> None:
    # The attacker signs with its own key but names the honest author.
    assert_rejected(victim, resign(honest_entry, ATTACKER), RejectReason.BAD_SIGNATURE)


def test_write_into_another_authors_namespace_is_rejected(
    victim: Ledger, honest_entry: Entry
) -> None:
    attacker = make_ledger(6, FakeClock())
    # Correctly signed by the attacker, but the key is the honest node's profile.
    hijack = resign(honest_entry, ATTACKER, author=attacker.peer_id, counter=99)
    assert_rejected(victim, hijack, RejectReason.WRONG_NAMESPACE)
    forged_report = resign(
        honest_entry, ATTACKER, author=attacker.peer_id,
        key=f"report/{honest_entry.author}/{victim.peer_id}",
    )
    assert_rejected(victim, forged_report, RejectReason.WRONG_NAMESPACE)


def test_clock_an_hour_in_the_future_is_rejected(
    victim: Ledger, honest_entry: Entry, clock: FakeClock
) -> None:
    future = resign(honest_entry, KEY_PAIRS[2], wall_ms=int((clock.now + 3600) * 1000))
    assert_rejected(victim, future, RejectReason.FUTURE_CLOCK)
    within_skew = resign(honest_entry, KEY_PAIRS[2], wall_ms=int((clock.now + 30) * 1000))
    assert victim.merge([within_skew]).accepted == [within_skew]


def test_oversized_entry_is_rejected(victim: Ledger, honest_entry: Entry) -> None:
    huge = resign(honest_entry, KEY_PAIRS[2], payload=msgpack.packb("x" * 70_000))
    assert_rejected(victim, huge, RejectReason.TOO_LARGE)


def test_size_and_skew_limits_are_configurable(clock: FakeClock, honest_entry: Entry) -> None:
    strict = make_ledger(0, clock, limits=Limits(max_clock_skew_ms=0, max_entry_bytes=300))
    assert strict.merge([honest_entry]).rejected_by_reason == {RejectReason.TOO_LARGE: 1}
    small = make_ledger(2, clock).put_report(strict.peer_id, 0.5, "")
    assert strict.merge([small]).accepted == [small]
    ahead = resign(small, KEY_PAIRS[2], wall_ms=small.wall_ms + 1)
    assert strict.merge([ahead]).rejected_by_reason == {RejectReason.FUTURE_CLOCK: 1}


def test_invalid_payload_is_rejected(victim: Ledger, honest_entry: Entry) -> None:
    bad_profile = resign(honest_entry, KEY_PAIRS[2], payload=msgpack.packb({"schema_version": 1}))
    assert_rejected(victim, bad_profile, RejectReason.INVALID_PAYLOAD)
    not_msgpack = resign(honest_entry, KEY_PAIRS[2], payload=b"\xc1\xff")
    assert_rejected(victim, not_msgpack, RejectReason.INVALID_PAYLOAD)


RSA_PEER_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize("author", ["", "not-a-peer-id", RSA_PEER_ID])
def test_author_that_is_not_an_ed25519_peer_id_is_malformed(
    victim: Ledger, honest_entry: Entry, author: str
) -> None:
    entry = Entry(f"profile/{author}", honest_entry.payload, 1, 0, author, 0, False, bytes(64))
    reason = RejectReason.MALFORMED if author else RejectReason.WRONG_NAMESPACE
    assert_rejected(victim, entry, reason)


def test_wrongly_typed_entry_is_malformed(victim: Ledger, honest_entry: Entry) -> None:
    entry = Entry(honest_entry.key, "text", 1, 0, honest_entry.author, 0, False, b"")  # type: ignore[arg-type]
    assert_rejected(victim, entry, RejectReason.MALFORMED)


def test_a_hostile_batch_keeps_its_honest_entries(victim: Ledger, honest_entry: Entry) -> None:
    forged = resign(honest_entry, ATTACKER, counter=5)
    result = victim.merge([forged, honest_entry])
    assert result.accepted == [honest_entry]
    assert result.rejected_by_reason == {RejectReason.BAD_SIGNATURE: 1}


def test_rejected_entry_is_not_relayed(clock: FakeClock, honest_entry: Entry) -> None:
    relay, downstream = make_ledger(0, clock), make_ledger(3, clock)
    forged = resign(honest_entry, ATTACKER)
    accepted = relay.merge([forged]).accepted
    downstream.merge(accepted)
    downstream.merge(relay.missing_for(downstream.digest()))
    assert downstream.entries() == []


GARBAGE = [
    b"",
    b"\x00",
    b"\xc1",
    b"\xdd\xff\xff\xff\xff",
    b"\x93\xaeknexa.ledger/1\xa7entries\x91\x98",
    msgpack.packb(["knexa.ledger/1", "entries", [[1, 2, 3]]]),
    msgpack.packb(["knexa.ledger/1", "entries", [["k", -1, 0, "a", 0, False, b"", b""]]]),
    msgpack.packb(["knexa.ledger/1", "digest", []]),
    msgpack.packb({"a": 1}),
    msgpack.packb({1: 2}, strict_types=False),
    b"\x91" * 100_000,
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_bytes_are_counted_and_change_nothing(victim: Ledger, data: bytes) -> None:
    before = state_of(victim)
    result = victim.merge_message(data)
    assert result.accepted == [] and result.rejected_by_reason == {UNDECODABLE: 1}
    assert victim.counters.rejected[UNDECODABLE] == 1
    assert state_of(victim) == before


_SAMPLE_LEDGER = make_ledger(4, FakeClock())
_SAMPLE_ENTRY = _SAMPLE_LEDGER.put_profile(sample_profile())


DECODERS = [codec.decode_entries, codec.decode_digest, codec.decode_bucket_summary]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(DECODERS))
def test_codec_raises_only_codec_error_on_random_bytes(data: bytes, decode) -> None:
    try:
        decode(data)
    except codec.CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(DECODERS))
def test_codec_raises_only_codec_error_on_mutated_messages(data: st.DataObject, decode) -> None:
    valid = {
        codec.decode_entries: codec.encode_entries([_SAMPLE_ENTRY]),
        codec.decode_digest: codec.encode_digest(_SAMPLE_LEDGER.digest(frozenset({1, 2}))),
        codec.decode_bucket_summary: codec.encode_bucket_summary(_SAMPLE_LEDGER.bucket_summary()),
    }[decode]
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(bytes(raw[:cut]))
    except codec.CodecError:
        pass


def test_codec_rejects_a_message_over_its_size_limit() -> None:
    data = codec.encode_entries([_SAMPLE_ENTRY])
    with pytest.raises(codec.CodecError):
        codec.decode_entries(data, max_bytes=len(data) - 1)
    assert codec.decode_entries(data) == [_SAMPLE_ENTRY]


def test_forgeries_are_found_in_a_batch_large_enough_for_parallel_checks(
    clock: FakeClock,
) -> None:
    writer = make_ledger(2, clock)
    batch = [writer.put_report(f"subject-{i}", 0.5, "") for i in range(PARALLEL_MIN_BATCH + 44)]
    forged_at = {0, 7, 150, len(batch) - 1}
    for i in forged_at:
        batch[i] = dataclasses.replace(batch[i], signature=bytes(64))
    receiver = Ledger(KEY_PAIRS[0], clock=clock, verifier=Verifier(workers=3))
    result = receiver.merge(batch)
    assert result.rejected_by_reason == {RejectReason.BAD_SIGNATURE: len(forged_at)}
    assert result.accepted == [e for i, e in enumerate(batch) if i not in forged_at]
