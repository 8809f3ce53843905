"""Sans-IO parts of the RPC layer: framing, envelopes, replay cache, flow control, tensors."""

from __future__ import annotations

import hashlib
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc.auth import EnvelopeAuthenticator
from knexa.net.rpc.envelope import (
    Kind,
    decode_envelope,
    seal,
    sign_payload,
    verify_detached,
    verify_signature,
)
from knexa.net.rpc.errors import CodecError, ErrorCode, FrameTooLarge, RpcError
from knexa.net.rpc.flow import FlowControlError, RecvCredit, SendCredit
from knexa.net.rpc.frames import Frame, FrameDecoder, FrameType, decode_payload, encode_frame
from knexa.net.rpc.replay import ReplayCache
from knexa.net.rpc.tensor_stream import (
    StreamEnd,
    TensorData,
    TensorStreamDecoder,
    TensorStreamError,
    tensor_messages,
)
from knexa.net.rpc.tensors import TensorCodecError, decode_tensors, encode_tensors

KP_A = create_new_key_pair()
KP_B = create_new_key_pair()
ID_A = PeerID.from_pubkey(KP_A.public_key).to_bytes()
ID_B = PeerID.from_pubkey(KP_B.public_key).to_bytes()

frames_st = st.one_of(
    st.builds(lambda t, c, e, w: Frame(t, c, e, w if t is FrameType.OPEN else 0),
              st.sampled_from([FrameType.OPEN]), st.integers(0, 2**64 - 1),
              st.binary(max_size=64), st.integers(0, 2**64 - 1)),
    st.builds(Frame, st.sampled_from([FrameType.ITEM, FrameType.CLOSE, FrameType.RESPONSE]),
              st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    st.builds(lambda c, v: Frame(FrameType.CREDIT, c, value=v), st.integers(0, 2**64 - 1),
              st.integers(0, 2**64 - 1)),
    st.builds(lambda c: Frame(FrameType.CANCEL, c), st.integers(0, 2**64 - 1)),
)


# -- frames -----------------------------------------------------------------

@given(st.lists(frames_st, max_size=8), st.integers(1, 50))
def test_frames_round_trip_through_any_split(frames: list[Frame], piece: int) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder(1 << 20)
    out = []
    for i in range(0, len(wire), piece):
        dec.feed(wire[i : i + piece])
        while (f := dec.next_frame()) is not None:
            out.append(f)
    assert out == frames
    assert dec.buffered == 0


@given(st.binary(max_size=512))
def test_frame_decoder_raises_only_codec_errors(data: bytes) -> None:
    dec = FrameDecoder(256)
    dec.feed(data)
    try:
        while dec.next_frame() is not None:
            pass
    except CodecError:
        pass


@given(st.binary(max_size=256))
def test_decode_payload_raises_only_codec_errors(data: bytes) -> None:
    try:
        decode_payload(data)
    except CodecError:
        pass


def test_oversized_prefix_rejected_before_buffering() -> None:
    dec = FrameDecoder(1024)
    dec.feed(struct.pack(">I", 2**31))
    with pytest.raises(FrameTooLarge):
        dec.next_payload()
    assert dec.buffered == 4  # nothing of the announced payload was awaited or allocated


# -- envelopes ----------------------------------------------------------------

def _env(**over: object) -> bytes:
    args: dict = dict(kind=Kind.REQUEST, method="m", call_id=7, seq=0, sender=ID_A,
                      recipient=ID_B, body=b"\x81\xa1x\x01", timeout_ms=500)
    args.update(over)
    return seal(KP_A, **args)


def test_envelope_round_trip_and_signature() -> None:
    env = decode_envelope(_env())
    assert (env.kind, env.method, env.call_id, env.timeout_ms) == (Kind.REQUEST, "m", 7, 500)
    verify_signature(env)


@pytest.mark.parametrize("field,value", [
    ("method", "other"), ("call_id", 8), ("seq", 1), ("recipient", ID_A), ("ts_ms", 1),
    ("nonce", b"\x00" * 16), ("timeout_ms", 0), ("status", 1), ("body", b"\xc0"),
])
def test_every_signed_field_is_bound(field: str, value: object) -> None:
    fields = msgpack.unpackb(_env(), raw=False)
    index = {"method": 2, "call_id": 3, "seq": 4, "recipient": 6, "ts_ms": 7, "nonce": 8,
             "timeout_ms": 9, "status": 10, "body": 11}[field]
    fields[index] = value
    env = decode_envelope(msgpack.packb(fields, use_bin_type=True))
    with pytest.raises(RpcError) as info:
        verify_signature(env)
    assert info.value.code is ErrorCode.UNAUTHORIZED


@given(st.sampled_from(list(Kind)), st.text(max_size=40), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.binary(max_size=2000), st.integers(0, 2**32),
       st.integers(0, 2**16 - 1))
@settings(max_examples=50)
def test_envelope_round_trip_property(kind: Kind, method: str, call_id: int, seq: int,
                                      body: bytes, timeout_ms: int, status: int) -> None:
    raw = seal(KP_A, kind=kind, method=method, call_id=call_id, seq=seq, sender=ID_A,
               recipient=ID_B, body=body, timeout_ms=timeout_ms, status=status)
    env = decode_envelope(raw)
    assert (env.kind, env.method, env.call_id, env.seq, env.body, env.timeout_ms, env.status) \
        == (kind, method, call_id, seq, body, timeout_ms, status)
    verify_signature(env)


def test_envelope_signed_by_someone_else_is_rejected() -> None:
    forged = seal(KP_B, kind=Kind.REQUEST, method="m", sender=ID_A, recipient=ID_B, body=b"")
    with pytest.raises(RpcError):
        verify_signature(decode_envelope(forged))


@given(st.binary(max_size=300))
def test_decode_envelope_raises_only_codec_errors(data: bytes) -> None:
    try:
        decode_envelope(data)
    except CodecError:
        pass


def test_detached_payload_verifies_anywhere() -> None:
    data = sign_payload(KP_A, "reputation/v1", b"report", recipient=None)
    env = verify_detached(data, topic="reputation/v1", sender=PeerID(ID_A), max_age_s=60)
    assert env.body == b"report" and env.sender == ID_A
    with pytest.raises(RpcError):
        verify_detached(data, topic="other")
    with pytest.raises(RpcError):
        verify_detached(data, sender=PeerID(ID_B))
    tampered = bytearray(data)
    tampered[-70] ^= 1  # inside the body or signature
    with pytest.raises(RpcError):
        verify_detached(bytes(tampered))
    with pytest.raises(RpcError) as info:
        verify_detached(b"garbage")
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_authenticator_checks_peer_recipient_skew_and_replay() -> None:
    auth = EnvelopeAuthenticator(ID_B, skew_ms=1000)
    raw = _env(ts_ms=10_000)
    env = decode_envelope(raw)
    auth.check(env, ID_A, now_ms=10_500)

    def code(env_bytes: bytes, conn: bytes = ID_A, now: int = 10_000) -> ErrorCode:
        with pytest.raises(RpcError) as info:
            auth.check(decode_envelope(env_bytes), conn, now)
        return info.value.code

    assert code(raw) is ErrorCode.UNAUTHORIZED  # replay
    assert code(_env(ts_ms=10_000), conn=ID_B) is ErrorCode.UNAUTHORIZED  # not the conn peer
    assert code(_env(ts_ms=10_000, recipient=ID_A)) is ErrorCode.UNAUTHORIZED
    assert code(_env(ts_ms=5_000)) is ErrorCode.UNAUTHORIZED  # too old
    assert code(_env(ts_ms=20_000)) is ErrorCode.UNAUTHORIZED  # from the future


# -- replay cache -------------------------------------------------------------

def test_replay_cache_is_bounded_and_never_reopens_a_replay() -> None:
    cache = ReplayCache(window_ms=1000, max_entries=3)
    for i in range(3):
        assert cache.check_and_add(b"n%d" % i, ts_ms=100 + i, now_ms=100)
    assert not cache.check_and_add(b"n1", ts_ms=101, now_ms=100)
    assert cache.check_and_add(b"n3", ts_ms=103, now_ms=100)  # evicts n0 (ts 100)
    assert len(cache) == 3
    assert not cache.check_and_add(b"n0", ts_ms=100, now_ms=100)  # below the floor
    assert not cache.check_and_add(b"zz", ts_ms=99, now_ms=100)
    assert cache.check_and_add(b"n9", ts_ms=5000, now_ms=5000)  # old entries expire
    assert len(cache) == 1


# -- flow control -------------------------------------------------------------

def test_credit_bounds_what_the_receiver_buffers() -> None:
    send, recv = SendCredit(100), RecvCredit(100, max_message=60)
    sent = 0
    while send.can_send():
        send.consume(60)
        recv.on_receive(60)
        sent += 60
    assert sent == 120 and recv.buffered == 120  # window + one message at most
    with pytest.raises(FlowControlError):
        recv.on_receive(10)  # sending without credit
    assert recv.on_consume(30) == 0
    grant = recv.on_consume(30)
    assert grant == 60
    send.grant(grant)
    assert send.can_send()
    with pytest.raises(FlowControlError):
        send.grant(0)


# -- tensors ------------------------------------------------------------------

dtypes = st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "i1", "u1", "<u2", "?"])


@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                       st.tuples(dtypes, st.lists(st.integers(0, 5), max_size=3)), max_size=4))
@settings(max_examples=60)
def test_tensor_codec_round_trip(spec: dict) -> None:
    rng = np.random.default_rng(0)
    tensors = {name: rng.integers(0, 100, size=shape).astype(dt)
               for name, (dt, shape) in spec.items()}
    out = decode_tensors(encode_tensors(tensors), max_size=1 << 20)
    assert out.keys() == tensors.keys()
    for name, arr in tensors.items():
        assert out[name].dtype == arr.dtype and np.array_equal(out[name], arr)


def test_tensor_codec_is_safetensors_compatible() -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], "<i8")}
    theirs = safetensors_numpy.load(encode_tensors(tensors))
    ours = decode_tensors(safetensors_numpy.save(tensors), max_size=1 << 20)
    for name, arr in tensors.items():
        assert np.array_equal(theirs[name], arr) and np.array_equal(ours[name], arr)


@given(st.binary(max_size=400))
def test_tensor_decoder_raises_only_codec_errors(data: bytes) -> None:
    try:
        decode_tensors(data, max_size=1 << 16)
    except TensorCodecError:
        pass


def test_tensor_sizes_are_checked_before_allocating() -> None:
    header = b'{"x":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}'
    with pytest.raises(TensorCodecError):
        decode_tensors(struct.pack("<Q", len(header)) + header, max_size=1 << 20)
    with pytest.raises(TensorCodecError):
        decode_tensors(struct.pack("<Q", 2**60) + b"{}", max_size=1 << 20)
    with pytest.raises(TensorCodecError):
        decode_tensors(b"\x00" * ((1 << 20) + (16 << 20) + 9), max_size=1 << 20)


def test_tensor_stream_round_trip_and_integrity() -> None:
    tensors = {"k": np.arange(1000, dtype=np.float32), "e": np.zeros(0, np.int8),
               "v": np.arange(33, dtype=np.int16)}
    msgs = [m if isinstance(m, dict) else msgpack.unpackb(m.data)
            for m in tensor_messages(tensors, chunk_size=257)]
    dec = TensorStreamDecoder(max_total=1 << 20)
    got: dict[str, bytearray] = {}
    for m in msgs:
        for ev in dec.feed(m):
            if isinstance(ev, TensorData):
                got.setdefault(ev.spec.name, bytearray()).extend(ev.data)
            elif isinstance(ev, StreamEnd):
                # SHA-256 over the header and the SHA-256 of each chunk message
                expected = hashlib.sha256(msgs[0]["hdr"])
                for chunk in msgs[1:-1]:
                    expected.update(hashlib.sha256(msgpack.packb(chunk)).digest())
                assert ev.digest == expected.digest() == msgs[-1]["digest"]
    assert dec.done
    assert bytes(got["k"]) == tensors["k"].tobytes() and "e" not in got

    fast = TensorStreamDecoder(max_total=1 << 20)
    for m in tensor_messages(tensors, chunk_size=257):  # packed chunks with digests
        fast.feed(m)
    assert fast.done

    def fails(mutated: list, limit: int = 1 << 20) -> None:
        d = TensorStreamDecoder(max_total=limit)
        with pytest.raises(TensorStreamError):
            for m in mutated:
                d.feed(m)

    bad_chunk = dict(msgs[1], d=bytes([msgs[1]["d"][0] ^ 0xFF]) + msgs[1]["d"][1:])
    fails([msgs[0], bad_chunk, *msgs[2:]])  # digest mismatch
    fails([msgs[0], *msgs[2:]])  # missing chunk: offset mismatch
    fails(msgs[:-2] + msgs[-1:])  # early end
    fails(msgs, limit=100)  # header over the limit, before any allocation
    fails(msgs[1:])  # no header


@given(st.lists(st.one_of(st.none(), st.integers(), st.binary(max_size=20),
                          st.dictionaries(st.sampled_from(["t", "hdr", "total", "alg", "o", "d",
                                                           "digest"]),
                                          st.one_of(st.sampled_from(["h", "c", "e", "sha256"]),
                                                    st.integers(), st.binary(max_size=40))),
                          ), max_size=5))
def test_tensor_stream_decoder_raises_only_its_error(msgs: list) -> None:
    dec = TensorStreamDecoder(max_total=1 << 16)
    try:
        for m in msgs:
            dec.feed(m)
    except TensorStreamError:
        pass


def test_torch_tensors_round_trip_when_torch_is_installed() -> None:
    torch = pytest.importorskip("torch")
    tensors = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
               "m": torch.tensor([True, False]), "e": torch.zeros(0, 4)}
    data = encode_tensors(tensors)
    back = decode_tensors(data, max_size=1 << 20, framework="torch")
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert decode_tensors(data, max_size=1 << 20)["w"].dtype == np.uint16  # raw bf16 words
