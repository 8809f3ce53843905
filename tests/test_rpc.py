"""The signed RPC layer between real hosts on loopback: calls, limits, hostile peers."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from knexa.net.rpc import PROTOCOL_ID, CallContext, ErrorCode, RpcConfig, RpcError
from knexa.net.rpc.config import INITIAL_WINDOW
from knexa.net.rpc.envelope import Envelope, Kind, decode_envelope, seal, verify_detached
from knexa.net.rpc.frames import Frame, FrameDecoder, FrameType, encode_frame

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from rpc_helpers import rpc_nodes  # noqa: E402


class AddRequest(BaseModel):
    a: int
    b: int


class AddResponse(BaseModel):
    total: int


async def add(req: AddRequest, ctx: CallContext) -> AddResponse:
    return AddResponse(total=req.a + req.b)


async def echo(req: object, ctx: CallContext) -> object:
    return req


async def count(req: dict, ctx: CallContext) -> None:
    for i in range(req["n"]):
        await ctx.send({"i": i})


async def total(requests, ctx: CallContext) -> int:  # type: ignore[no-untyped-def]
    s = 0
    async for item in requests:
        s += item
    return s


def serve_basics(node) -> None:  # type: ignore[no-untyped-def]
    node.rpc.register("add", add, AddRequest, AddResponse)
    node.rpc.register("echo", echo)
    node.rpc.register("count", count, dict, dict, kind="server_stream")
    node.rpc.register("sum", total, int, int, kind="client_stream")


# -- round trips ----------------------------------------------------------------

async def test_unary_server_stream_client_stream_round_trips() -> None:
    async with rpc_nodes(2) as (a, b):
        serve_basics(b)
        res = await a.rpc.call(b.peer_id, "add", AddRequest(a=2, b=3), response_model=AddResponse)
        assert res == AddResponse(total=5)
        assert await a.rpc.call(b.peer_id, "echo", {"x": [1, b"\x00"]}) == {"x": [1, b"\x00"]}
        async with a.rpc.server_stream(b.peer_id, "count", {"n": 50}) as responses:
            assert [r["i"] async for r in responses] == list(range(50))
        async with a.rpc.client_stream(b.peer_id, "sum") as sink:
            for i in range(100):
                await sink.send(i)
            assert await sink.finish() == sum(range(100))
        # b can call a over its own stream, too
        serve_basics(a)
        assert (await b.rpc.call(a.peer_id, "add", {"a": 1, "b": 1}))["total"] == 2


async def test_a_call_on_a_pooled_stream_that_died_unnoticed_opens_again_on_a_fresh_one() -> None:
    """Just after a connection closes, its stream can still sit in the pool before the session's reader
    has seen the close; the next call's OPEN frame then fails to write (seen in CI as "stream write failed:
    RPC stream is closed"). Nothing reached the server, so the call opens again on a new stream. The dead
    stream is simulated by making its writes fail: the race itself cannot be forced."""
    async with rpc_nodes(2) as (a, b):
        serve_basics(b)
        assert (await a.rpc.call(b.peer_id, "add", {"a": 1, "b": 1}))["total"] == 2
        for opened in ("unary", "server_stream", "client_stream"):
            [stale] = a.rpc._clients[b.peer_id]

            async def dead(frame: object) -> int:
                raise RuntimeError("RPC stream is closed")

            stale.fs.send = dead
            if opened == "unary":
                assert (await a.rpc.call(b.peer_id, "add", {"a": 2, "b": 3}))["total"] == 5
            elif opened == "server_stream":
                async with a.rpc.server_stream(b.peer_id, "count", {"n": 3}) as responses:
                    assert [r["i"] async for r in responses] == [0, 1, 2]
            else:
                async with a.rpc.client_stream(b.peer_id, "sum") as sink:
                    await sink.send(4)
                    assert await sink.finish() == 4
            assert stale.closed and a.rpc._clients[b.peer_id] != [stale]
            await stale.fs.reset()
        # A second dead stream in a row is the caller's error, not a loop.
        [fresh] = a.rpc._clients[b.peer_id]
        fresh.fs.send = dead

        async def dial_dead(peer_id: object) -> object:
            session = fresh.__class__(a.rpc, fresh.fs)
            a.rpc._clients[b.peer_id].append(session)
            return session

        a.rpc._session = dial_dead
        with pytest.raises(RpcError, match="stream write failed"):
            await a.rpc.call(b.peer_id, "add", {"a": 1, "b": 1})


async def test_typed_errors_reach_the_caller() -> None:
    async with rpc_nodes(2) as (a, b):
        serve_basics(b)

        async def boom(req: object, ctx: CallContext) -> None:
            raise ValueError("secret detail")

        async def refuse(req: object, ctx: CallContext) -> None:
            raise RpcError(ErrorCode.UNAUTHORIZED, "not you")

        b.rpc.register("boom", boom)
        b.rpc.register("refuse", refuse)
        cases = [
            ("nope", {}, ErrorCode.UNKNOWN_METHOD),
            ("add", {"a": "x"}, ErrorCode.BAD_REQUEST),
            ("add", [1, 2], ErrorCode.BAD_REQUEST),
            ("boom", None, ErrorCode.INTERNAL),
            ("refuse", None, ErrorCode.UNAUTHORIZED),
        ]
        for method, body, code in cases:
            with pytest.raises(RpcError) as info:
                await a.rpc.call(b.peer_id, method, body)
            assert info.value.code is code, (method, info.value)
        assert "secret" not in str(info.value)
        with pytest.raises(RpcError) as info:
            async with a.rpc.client_stream(b.peer_id, "sum") as sink:
                await sink.send("not an int")
                await sink.finish()
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert await a.rpc.call(b.peer_id, "add", {"a": 1, "b": 2}) == {"total": 3}


async def test_oversized_messages_fail_alone() -> None:
    async with rpc_nodes(2, max_message_size=64 * 1024) as (a, b):
        serve_basics(b)

        async def big_reply(req: int, ctx: CallContext) -> bytes:
            return b"z" * req

        b.rpc.register("big_reply", big_reply, int, bytes)
        with pytest.raises(RpcError) as info:
            await a.rpc.call(b.peer_id, "echo", b"x" * 100_000)
        assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE  # refused before sending
        with pytest.raises(RpcError) as info:
            await a.rpc.call(b.peer_id, "big_reply", 100_000)
        assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE  # the server would not send it
        assert await a.rpc.call(b.peer_id, "big_reply", 1000) == b"z" * 1000
        await still_serving(a, b)


async def test_200_concurrent_calls_share_one_stream() -> None:
    async with rpc_nodes(2) as (a, b):
        async def slow_echo(req: int, ctx: CallContext) -> int:
            await trio.sleep(0.001 * (req % 7))
            return req

        b.rpc.register("slow_echo", slow_echo, int, int)
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await a.rpc.call(b.peer_id, "slow_echo", i, timeout=30)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        assert results == {i: i for i in range(200)}
        assert len(a.rpc._clients[b.peer_id]) == 1  # one reused stream, not 200


async def test_a_small_stream_pool_spreads_calls() -> None:
    config = RpcConfig(streams_per_peer=2, calls_per_stream=8)
    async with rpc_nodes(2, config=config) as (a, b):
        async def nap(req: int, ctx: CallContext) -> int:
            await trio.sleep(0.05)
            return req

        b.rpc.register("nap", nap, int, int)
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(a.rpc.call, b.peer_id, "nap", i)
        assert len(a.rpc._clients[b.peer_id]) == 2


# -- limits, deadlines, cancellation ------------------------------------------

async def test_per_peer_concurrency_limit_gives_overloaded() -> None:
    async with rpc_nodes(2, max_concurrent_per_peer=2) as (a, b):
        release = trio.Event()

        async def wait(req: object, ctx: CallContext) -> str:
            await release.wait()
            return "done"

        b.rpc.register("wait", wait)
        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append(await a.rpc.call(b.peer_id, "wait", None, timeout=10))
            except RpcError as err:
                outcomes.append(err.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await trio.sleep(0.2)
            await one()
            release.set()
        assert sorted(map(str, outcomes)) == sorted(map(str, ["done", "done",
                                                               ErrorCode.OVERLOADED]))


async def test_deadline_times_out_caller_and_cancels_handler() -> None:
    async with rpc_nodes(2) as (a, b):
        seen: dict[str, object] = {}
        cancelled = trio.Event()

        async def slow(req: object, ctx: CallContext) -> str:
            seen["deadline"] = trio.current_effective_deadline() - trio.current_time()
            try:
                await trio.sleep(30)
            except trio.Cancelled:
                cancelled.set()
                raise
            return "late"

        b.rpc.register("slow", slow)
        start = trio.current_time()
        with pytest.raises(RpcError) as info:
            await a.rpc.call(b.peer_id, "slow", None, timeout=0.3)
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert trio.current_time() - start < 1.0
        with trio.fail_after(2):
            await cancelled.wait()  # the server-side handler saw the cancellation
        assert 0 < seen["deadline"] <= 0.3  # the deadline travelled with the request
        # an enclosing cancel scope's deadline travels the same way (and, trio-style,
        # that scope rather than the call reports the expiry)
        cancelled = trio.Event()
        with trio.move_on_after(0.2) as scope:
            await a.rpc.call(b.peer_id, "slow", None)
        assert scope.cancelled_caught
        assert 0 < seen["deadline"] <= 0.2
        with trio.fail_after(2):
            await cancelled.wait()


async def test_caller_cancellation_reaches_the_server() -> None:
    async with rpc_nodes(2) as (a, b):
        started, cancelled = trio.Event(), trio.Event()

        async def forever(req: object, ctx: CallContext) -> None:
            started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.set()
                raise

        b.rpc.register("forever", forever)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.rpc.call, b.peer_id, "forever", None)
            await started.wait()
            nursery.cancel_scope.cancel()  # no deadline: only the CANCEL frame can stop it
        with trio.fail_after(2):
            await cancelled.wait()
        # leaving a server stream early cancels it too
        started, cancelled = trio.Event(), trio.Event()

        async def stream_forever(req: object, ctx: CallContext) -> None:
            try:
                i = 0
                while True:
                    await ctx.send(i)
                    i += 1
                    started.set()
            except trio.Cancelled:
                cancelled.set()
                raise

        b.rpc.register("stream_forever", stream_forever, kind="server_stream")
        async with a.rpc.server_stream(b.peer_id, "stream_forever") as responses:
            async for item in responses:
                if item == 3:
                    break
        with trio.fail_after(2):
            await cancelled.wait()
        serve_basics(b)  # the connection still serves
        assert await a.rpc.call(b.peer_id, "echo", 7) == 7


async def test_server_stream_backpressure_bounds_the_sender() -> None:
    window = 256 * 1024
    async with rpc_nodes(2) as (a, b):
        progress = {"sent": 0}
        item = b"x" * (32 * 1024)

        async def firehose(req: object, ctx: CallContext) -> None:
            for _ in range(200):
                await ctx.send(item)
                progress["sent"] += 1

        b.rpc.register("firehose", firehose, kind="server_stream")
        received = 0
        max_ahead = 0
        async with a.rpc.server_stream(b.peer_id, "firehose", window=window) as responses:
            async for _ in responses:
                received += 1
                await trio.sleep(0.002)  # a slow reader
                max_ahead = max(max_ahead, progress["sent"] - received)
        assert received == 200
        # the sender never runs ahead by more than the window plus one message
        assert max_ahead <= window // len(item) + 2, max_ahead


async def test_client_stream_backpressure_and_early_server_error() -> None:
    async with rpc_nodes(2) as (a, b):
        consumed = {"n": 0}

        async def slow_sink(requests, ctx: CallContext) -> int:  # type: ignore[no-untyped-def]
            async for _ in requests:
                consumed["n"] += 1
                await trio.sleep(0.001)
            return consumed["n"]

        b.rpc.register("slow_sink", slow_sink, bytes, int, kind="client_stream")
        item = b"y" * (64 * 1024)
        max_ahead = 0
        async with a.rpc.client_stream(b.peer_id, "slow_sink") as sink:
            for i in range(300):
                await sink.send(item)
                max_ahead = max(max_ahead, i + 1 - consumed["n"])
            assert await sink.finish() == 300
        stream_window = a.rpc.config.stream_window
        assert max_ahead <= stream_window // len(item) + 4, max_ahead


async def test_metrics_snapshot_and_prometheus_registry() -> None:
    async with rpc_nodes(2) as (a, b):
        serve_basics(b)
        registry = CollectorRegistry()
        b.rpc.register_metrics(registry)
        await a.rpc.call(b.peer_id, "add", {"a": 1, "b": 2})
        with pytest.raises(RpcError):
            await a.rpc.call(b.peer_id, "nope", None)
        snap = a.rpc.metrics.snapshot()
        assert {"role": "client", "method": "add", "outcome": "ok", "count": 1} in snap["calls"]
        assert {"role": "client", "method": "nope", "outcome": "unknown_method",
                "count": 1} in snap["calls"]
        assert snap["bytes_out"] > 0 and snap["bytes_in"] > 0
        assert snap["latency_seconds"]["client:add"]["count"] == 1
        text = generate_latest(registry).decode()
        assert 'knexa_rpc_calls_total{method="add",outcome="ok",role="server"} 1.0' in text
        assert "knexa_rpc_latency_seconds_bucket" in text


async def test_service_shutdown_is_clean_and_fails_pending_calls() -> None:
    async with rpc_nodes(2) as (a, b):
        async def forever(req: object, ctx: CallContext) -> None:
            await trio.sleep_forever()

        b.rpc.register("forever", forever)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async def caller() -> None:
                    with pytest.raises(RpcError) as info:
                        await a.rpc.call(b.peer_id, "forever", None)
                    assert info.value.code is ErrorCode.CANCELLED

                nursery.start_soon(caller)
                await trio.sleep(0.2)
                # stop b's service only: its handler tasks are cancelled, a is told
                for session in list(b.rpc._server_sessions):
                    session.shutdown()


# -- hostile peers --------------------------------------------------------------

class RawPeer:
    """Speaks the RPC protocol by hand over a stream it opened itself."""

    def __init__(self, node, target) -> None:  # type: ignore[no-untyped-def]
        self.node, self.target = node, target
        self.stream = None
        self.decoder = FrameDecoder(1 << 24)

    async def open(self) -> RawPeer:
        self.stream = await self.node.host.new_stream(self.target.peer_id, [PROTOCOL_ID])
        return self

    def request(self, call_id: int, method: str, body: object, *, key=None,  # type: ignore[no-untyped-def]
                sender: bytes | None = None, recipient: bytes | None = None) -> bytes:
        env = seal(key or self.node.key_pair, kind=Kind.REQUEST, method=method, call_id=call_id,
                   sender=sender or self.node.peer_id.to_bytes(),
                   recipient=recipient or self.target.peer_id.to_bytes(),
                   body=msgpack.packb(body, use_bin_type=True), timeout_ms=5000)
        return encode_frame(Frame(FrameType.OPEN, call_id, env, 1 << 20))

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    async def response(self) -> tuple[int, Envelope] | None:
        """The next RESPONSE frame (verified as genuinely from the target), or None at EOF."""
        with trio.fail_after(5):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    if frame.type is FrameType.RESPONSE:
                        env = verify_detached(frame.envelope, sender=self.target.peer_id)
                        return frame.call_id, env
                    continue
                try:
                    data = await self.stream.read(1 << 20)
                except Exception:
                    data = b""
                if not data:
                    return None
                self.decoder.feed(data)


async def expect_error(raw: RawPeer, call_id: int, code: ErrorCode) -> None:
    got = await raw.response()
    assert got is not None, "the server closed without telling why"
    cid, env = got
    assert (cid, ErrorCode(env.status)) == (call_id, code), msgpack.unpackb(env.body)


async def still_serving(a, b) -> None:  # type: ignore[no-untyped-def]
    assert await a.rpc.call(b.peer_id, "add", {"a": 20, "b": 22}) == {"total": 42}


async def test_hostile_framing_is_rejected_and_the_server_keeps_serving() -> None:
    async with rpc_nodes(3, max_message_size=64 * 1024) as (victim, honest, attacker):
        serve_basics(victim)
        await still_serving(honest, victim)  # dials honest -> victim
        cases = [
            (b"\xde\xad\xbe\xef" * 16, ErrorCode.MESSAGE_TOO_LARGE),  # garbage bytes
            (struct.pack(">I", 2**31), ErrorCode.MESSAGE_TOO_LARGE),  # oversized prefix
            (struct.pack(">I", 8) + b"\xc1" * 8, ErrorCode.PROTOCOL_ERROR),  # garbage payload
            (struct.pack(">I", 3) + msgpack.packb([9, 1]), ErrorCode.PROTOCOL_ERROR),
        ]
        for data, code in cases:
            raw = await RawPeer(attacker, victim).open()
            await raw.send(data)
            await expect_error(raw, 0, code)
            assert await raw.response() is None  # and the stream is dropped
            await still_serving(honest, victim)
        # a frame cut short by the end of the stream
        raw = await RawPeer(attacker, victim).open()
        frame = raw.request(1, "add", {"a": 1, "b": 2})
        await raw.send(frame[: len(frame) // 2])
        await raw.stream.close_write()
        await expect_error(raw, 0, ErrorCode.PROTOCOL_ERROR)
        await still_serving(honest, victim)
        assert victim.rpc.metrics.snapshot()["rejected"]["truncated"] == 1


async def test_forged_replayed_and_misaddressed_requests_are_unauthorized() -> None:
    async with rpc_nodes(4) as (victim, honest, attacker, third):
        serve_basics(victim)
        raw = await RawPeer(attacker, victim).open()
        # a genuine request works on the raw stream
        good = raw.request(1, "add", {"a": 1, "b": 2})
        await raw.send(good)
        cid, env = await raw.response()
        assert (cid, env.status, msgpack.unpackb(env.body)) == (1, 0, {"total": 3})
        # the very same signed bytes again: a replay
        await raw.send(good)
        await expect_error(raw, 1, ErrorCode.UNAUTHORIZED)
        # signed with another key than the one in the claimed sender id
        await raw.send(raw.request(2, "add", {"a": 1, "b": 2}, key=create_new_key_pair()))
        await expect_error(raw, 2, ErrorCode.UNAUTHORIZED)
        # genuinely signed by someone else, relayed over the attacker's connection
        await raw.send(raw.request(3, "add", {"a": 1, "b": 2}, key=third.key_pair,
                                   sender=third.peer_id.to_bytes()))
        await expect_error(raw, 3, ErrorCode.UNAUTHORIZED)
        # addressed to another peer
        await raw.send(raw.request(4, "add", {"a": 1, "b": 2},
                                   recipient=third.peer_id.to_bytes()))
        await expect_error(raw, 4, ErrorCode.UNAUTHORIZED)
        # a bit flipped in the body after signing
        tampered = bytearray(raw.request(5, "add", {"a": 1, "b": 2}))
        tampered[-70] ^= 0x01
        await raw.send(bytes(tampered))
        got = await raw.response()
        assert got is not None and ErrorCode(got[1].status) in (ErrorCode.UNAUTHORIZED,
                                                                ErrorCode.BAD_REQUEST)
        # per-call rejections keep the stream: a fresh request on it still works
        await raw.send(raw.request(6, "add", {"a": 2, "b": 2}))
        cid, env = await raw.response()
        assert (cid, env.status, msgpack.unpackb(env.body)) == (6, 0, {"total": 4})
        await still_serving(honest, victim)
        assert victim.rpc.metrics.snapshot()["rejected"]["unauthorized"] >= 4


async def test_stale_timestamp_is_rejected() -> None:
    async with rpc_nodes(2, skew_s=5) as (victim, attacker):
        serve_basics(victim)
        raw = await RawPeer(attacker, victim).open()
        env = seal(attacker.key_pair, kind=Kind.REQUEST, method="add", call_id=1,
                   sender=attacker.peer_id.to_bytes(), recipient=victim.peer_id.to_bytes(),
                   body=msgpack.packb({"a": 1, "b": 1}), ts_ms=1_000_000)
        await raw.send(encode_frame(Frame(FrameType.OPEN, 1, env, 1 << 20)))
        await expect_error(raw, 1, ErrorCode.UNAUTHORIZED)


async def test_sending_past_the_granted_credit_aborts_only_that_call() -> None:
    config = RpcConfig(stream_window=INITIAL_WINDOW)
    async with rpc_nodes(2, config=config) as (victim, attacker):
        serve_basics(victim)

        async def never_reads(requests, ctx: CallContext) -> None:  # type: ignore[no-untyped-def]
            await trio.sleep_forever()

        victim.rpc.register("never_reads", never_reads, kind="client_stream")
        raw = await RawPeer(attacker, victim).open()
        await raw.send(raw.request(1, "never_reads", None))
        item = msgpack.packb(b"q" * 60_000)
        for seq in range(1, INITIAL_WINDOW // 60_000 + 4):
            env = seal(attacker.key_pair, kind=Kind.ITEM, method="never_reads", call_id=1,
                       seq=seq, sender=attacker.peer_id.to_bytes(),
                       recipient=victim.peer_id.to_bytes(), body=item)
            await raw.send(encode_frame(Frame(FrameType.ITEM, 1, env)))
        await expect_error(raw, 1, ErrorCode.PROTOCOL_ERROR)
        await raw.send(raw.request(2, "add", {"a": 1, "b": 1}))
        cid, env = await raw.response()
        assert (cid, env.status) == (2, 0)


async def test_a_peer_cannot_park_unbounded_data_across_calls() -> None:
    config = RpcConfig(stream_window=1 << 20, max_buffered_per_peer=1536 * 1024)
    async with rpc_nodes(2, config=config) as (a, b):
        serve_basics(b)

        async def never_reads(requests, ctx: CallContext) -> None:  # type: ignore[no-untyped-def]
            await trio.sleep_forever()

        b.rpc.register("never_reads", never_reads, kind="client_stream")
        codes: list[ErrorCode] = []

        async def park() -> None:
            try:
                async with a.rpc.client_stream(b.peer_id, "never_reads", timeout=1) as sink:
                    for _ in range(10):
                        await sink.send(b"p" * 100_000)  # 1 MB: within each call's credit
                    await sink.finish()
            except RpcError as err:
                codes.append(err.code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(park)
        assert ErrorCode.OVERLOADED in codes  # the third megabyte did not fit the budget
        with trio.fail_after(2):  # what was parked is released when the calls end
            while b.rpc._buffered:  # noqa: ASYNC110 (polling internal state, test only)
                await trio.sleep(0.01)
        await still_serving(a, b)


def test_responses_are_detached_verifiable() -> None:
    kp = create_new_key_pair()
    pid = PeerID.from_pubkey(kp.public_key)
    raw = seal(kp, kind=Kind.RESPONSE, method="m", sender=pid.to_bytes(), recipient=b"x" * 38,
               body=b"\x01")
    assert decode_envelope(raw).body == b"\x01"
    assert verify_detached(raw, sender=pid).method == "m"
