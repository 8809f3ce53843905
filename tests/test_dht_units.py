"""Pure parts of knexa.dht, tested without sockets."""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio
import trio.lowlevel
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from knexa.dht.envelope import (
    MAX_TTL,
    RecordError,
    SignedRecord,
    decode_record,
    select_best,
    sign_record,
    verify_record,
)
from knexa.dht.keys import (
    DhtKeyError,
    adapter_key,
    model_key,
    parse_record_key,
    prefix_key,
    record_key,
)
from knexa.dht.logs import DHT_SERVER_LOGGER, DhtStreamCloseFilter
from knexa.dht.lookup import Reply, iterative_lookup, sort_by_distance
from knexa.dht.providers import dedupe_providers, to_peer_dict
from knexa.dht.validator import KnexaRecordValidator

NOW = 1_800_000_000.0


def _pid(kp: object) -> PeerID:
    return PeerID.from_pubkey(kp.public_key)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def alice():
    return create_new_key_pair()


@pytest.fixture(scope="module")
def mallory():
    return create_new_key_pair()


# ---- keys ---------------------------------------------------------------


def test_record_key_roundtrip(alice):
    key = record_key(_pid(alice), "peer")
    assert key == f"/knexa/peer/{_pid(alice).to_base58()}"
    assert len(key.encode()) <= 128  # py-libp2p's GET_VALUE key limit
    owner, name = parse_record_key(key)
    assert owner == _pid(alice) and name == "peer"
    long_key = record_key(_pid(alice), "a" * 64)
    assert len(long_key.encode()) <= 128


@pytest.mark.parametrize("key", ["", "/knexa/peer", "/ipns/x/y", "/knexa/Bad Name/12D3", "/knexa/peer/not-a-peer-id!"])
def test_parse_record_key_rejects(key):
    with pytest.raises(DhtKeyError):
        parse_record_key(key)


def test_content_keys_are_short_distinct_and_stable():
    keys = {
        model_key("smollm2-135m"),
        model_key("sha256:" + "ab" * 32),
        adapter_key("lora-1"),
        prefix_key("ab" * 32, [1, 2, 3]),
        prefix_key("ab" * 32, [1, 2, 4]),
        prefix_key("cd" * 32, [1, 2, 3]),
    }
    assert len(keys) == 6
    assert all(len(k) == 34 and k[:2] == b"\x12\x20" for k in keys)
    assert model_key("x") == model_key(" x ")
    assert model_key("x") != adapter_key("x")


@pytest.mark.parametrize(
    "call",
    [
        lambda: model_key(""),
        lambda: adapter_key("  "),
        lambda: prefix_key("h", []),
        lambda: prefix_key("h", [-1]),
        lambda: prefix_key("h", [2**32]),
        lambda: prefix_key("h", ["x"]),
    ],
)
def test_content_key_bad_input(call):
    with pytest.raises(DhtKeyError):
        call()


# ---- envelopes ----------------------------------------------------------


def test_sign_and_verify(alice):
    key = record_key(_pid(alice), "peer")
    rec = sign_record(alice, key, b"hello", seq=7, ttl=60, now=NOW)
    got = verify_record(key, rec.encode(), now=NOW + 1)
    assert got == rec and got.value == b"hello" and got.seq == 7
    assert got.owner == _pid(alice).to_base58()
    assert set(msgpack.unpackb(rec.encode())) == {
        "value",
        "owner",
        "expires_at",
        "seq",
        "signature",
    }


def test_expired_record_rejected(alice):
    key = record_key(_pid(alice), "peer")
    raw = sign_record(alice, key, b"v", seq=1, ttl=60, now=NOW).encode()
    with pytest.raises(RecordError, match="expired"):
        verify_record(key, raw, now=NOW + 61)


def test_far_future_expiry_rejected(alice):
    key = record_key(_pid(alice), "peer")
    raw = sign_record(alice, key, b"v", seq=1, ttl=MAX_TTL, now=NOW + 3600).encode()
    with pytest.raises(RecordError, match="future"):
        verify_record(key, raw, now=NOW)


def test_forged_signature_rejected(alice, mallory):
    """Mallory signs a record that claims to be Alice's."""
    key = record_key(_pid(alice), "peer")
    own = sign_record(mallory, record_key(_pid(mallory), "peer"), b"evil", seq=9, ttl=60, now=NOW)
    forged = SignedRecord(b"evil", _pid(alice).to_base58(), own.expires_at, 9, own.signature)
    with pytest.raises(RecordError, match="bad signature"):
        verify_record(key, forged.encode(), now=NOW)


def test_wrong_owner_rejected(alice, mallory):
    """A valid record of Mallory's offered under Alice's key."""
    raw = sign_record(mallory, record_key(_pid(mallory), "peer"), b"v", seq=1, ttl=60, now=NOW)
    with pytest.raises(RecordError, match="does not own"):
        verify_record(record_key(_pid(alice), "peer"), raw.encode(), now=NOW)


def test_cannot_sign_for_another_owner(alice, mallory):
    with pytest.raises(RecordError, match="belongs to"):
        sign_record(mallory, record_key(_pid(alice), "peer"), b"v", seq=1, ttl=60)


def test_replay_under_other_name_rejected(alice):
    raw = sign_record(alice, record_key(_pid(alice), "peer"), b"v", seq=1, ttl=60, now=NOW)
    with pytest.raises(RecordError, match="bad signature"):
        verify_record(record_key(_pid(alice), "other"), raw.encode(), now=NOW)


def test_tampered_value_rejected(alice):
    key = record_key(_pid(alice), "peer")
    rec = sign_record(alice, key, b"v", seq=1, ttl=60, now=NOW)
    tampered = SignedRecord(b"w", rec.owner, rec.expires_at, rec.seq, rec.signature)
    with pytest.raises(RecordError, match="bad signature"):
        verify_record(key, tampered.encode(), now=NOW)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"value": b"v"}),
        msgpack.packb({"value": "str", "owner": "x", "expires_at": 1.0, "seq": 1, "signature": b""}),
        msgpack.packb({"value": b"v", "owner": "x", "expires_at": 1.0, "seq": -1, "signature": b""}),
        msgpack.packb({"value": b"v", "owner": "x", "expires_at": float("nan"), "seq": 1, "signature": b""}),
        msgpack.packb({"value": b"v", "owner": 5, "expires_at": 1.0, "seq": 1, "signature": b""}),
        b"\x00" * 200_000,
    ],
)
def test_garbage_rejected(alice, raw):
    with pytest.raises(RecordError):
        decode_record(raw)
    with pytest.raises(RecordError):
        verify_record(record_key(_pid(alice), "peer"), raw, now=NOW)


def test_select_prefers_newer_seq_and_skips_invalid(alice, mallory):
    key = record_key(_pid(alice), "peer")
    old = sign_record(alice, key, b"old", seq=1, ttl=60, now=NOW).encode()
    new = sign_record(alice, key, b"new", seq=2, ttl=30, now=NOW).encode()
    evil = sign_record(mallory, record_key(_pid(mallory), "peer"), b"x", seq=99, ttl=60, now=NOW)
    assert select_best(key, [old, new], now=NOW) == 1
    assert select_best(key, [new, old], now=NOW) == 0
    assert select_best(key, [b"junk", evil.encode(), old], now=NOW) == 2
    with pytest.raises(RecordError):
        select_best(key, [b"junk"], now=NOW)


def test_libp2p_validator_adapter(alice, mallory):
    v = KnexaRecordValidator()
    key = record_key(_pid(alice), "peer")
    good = sign_record(alice, key, b"v", seq=1, ttl=60).encode()
    v.validate(key, good)
    with pytest.raises(RecordError):
        v.validate(key, b"junk")
    assert v.select(key, [b"junk", good]) == 1


# ---- providers ----------------------------------------------------------


def test_dedupe_providers_merges_addresses(alice, mallory):
    a, m = _pid(alice), _pid(mallory)
    x = Multiaddr("/ip4/127.0.0.1/tcp/1")
    y = Multiaddr("/ip4/127.0.0.1/tcp/2")
    out = dedupe_providers([PeerInfo(a, [x]), PeerInfo(m, [y]), PeerInfo(a, [x, y]), PeerInfo(a, [])])
    assert [p.peer_id for p in out] == [a, m]
    assert out[0].addrs == [x, y]
    assert dedupe_providers([PeerInfo(a, [x]), PeerInfo(m, [y])], limit=1)[0].peer_id == a
    d = to_peer_dict(PeerInfo(a, [Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{a}"), x]))
    assert d == {"peer_id": a.to_base58(), "addrs": ["/ip4/127.0.0.1/tcp/1"]}


# ---- lookup engine (fake network) ---------------------------------------


def _ids(n: int) -> list[PeerID]:
    return [_pid(create_new_key_pair()) for _ in range(n)]


async def test_lookup_converges_over_a_fake_network():
    """Each fake peer knows only its 3 nearest neighbours on a ring ordered by
    distance to the target; the lookup must still walk to the target's holder."""
    peers = _ids(40)
    target = b"some-content"
    ordered = sort_by_distance(target, peers)  # ordered[0] is the closest
    holder = ordered[0]
    knows = {p: ordered[max(0, i - 3) : i] for i, p in enumerate(ordered)}
    dead = {ordered[5]}

    async def query(peer: PeerID) -> Reply:
        await trio.lowlevel.checkpoint()
        if peer in dead:
            raise ConnectionError("down")
        return Reply(closer=knows[peer], hit=peer == holder)

    trace = await iterative_lookup(target, [ordered[-1]], query, alpha=3, k=4)
    assert trace.hit_hops is not None and trace.hit_hops > 1
    assert holder in trace.answered
    assert ordered[5] in trace.dead and trace.failed == 1

    found: list[PeerID] = []

    async def query2(peer: PeerID) -> Reply:
        r = await query(peer)
        if r.hit:
            found.append(peer)
        return r

    trace2 = await iterative_lookup(target, ordered[:3], query2, done=lambda: bool(found))
    assert found == [holder] and trace2.hit_hops == 1


async def test_lookup_with_no_seeds_ends_at_once():
    trace = await iterative_lookup(b"k", [], lambda p: None)  # type: ignore[arg-type,return-value]
    assert trace.queried == 0 and trace.hit_hops is None


# ---- log filter ---------------------------------------------------------


def test_stream_close_warning_filtered():
    f = DhtStreamCloseFilter()

    class StreamEOF(Exception):
        pass

    def rec(arg: object) -> logging.LogRecord:
        return logging.LogRecord(
            DHT_SERVER_LOGGER,
            logging.WARNING,
            __file__,
            1,
            "Failed to read DHT message from stream: %s",
            (arg,),
            None,
        )

    assert not f.filter(rec(StreamEOF()))
    assert not f.filter(rec(Exception("")))
    assert f.filter(rec(ValueError("real problem")))
    other = logging.LogRecord(DHT_SERVER_LOGGER, logging.WARNING, __file__, 1, "other", (), None)
    assert f.filter(other)
