"""Chunked streaming of large tensor sets (KV caches, adapter weights), sans-IO.

A stream is a safetensors file cut into messages: a header message with the
safetensors JSON header, data chunk messages in order, and an end message
with the integrity digest over the whole:

    digest = SHA-256(header || SHA-256(chunk message 1) || SHA-256(chunk message 2) ...)

where a chunk message is the msgpack map ``{"t": "c", "o": offset, "d": data}``.
Hashing the chunk messages (not the bare data) lets a signed-RPC transport
reuse the body digest its envelope signature already binds, so every byte is
hashed once per side. The receiver validates the header against its size
limit before allocating anything, checks offsets as chunks arrive and the
digest at the end. Messages are carried as the items of a server-stream (or
client-stream) call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from knexa.net.rpc.packing import bin_header, pack
from knexa.net.rpc.schema import PackedBody
from knexa.net.rpc.tensors import (
    MAX_HEADER,
    TensorCodecError,
    TensorSpec,
    header_json,
    parse_specs,
    spec_and_bytes,
    to_array,
)

DEFAULT_CHUNK = 1024 * 1024
_CHUNK_HEAD = b"\x83" + pack("t") + pack("c") + pack("o")  # a 3-entry map, first keys
_DATA_KEY = pack("d")
HASH = "sha256-list"


class TensorStreamError(TensorCodecError):
    """A tensor stream is malformed, too large, out of order or fails its digest."""


class TensorStreamEncoder:
    """Turns specs plus their raw bytes (in order) into stream messages."""

    def __init__(self, specs: list[TensorSpec], *, chunk_size: int = DEFAULT_CHUNK) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.specs = specs
        self.chunk_size = chunk_size
        self.header = header_json(specs)
        self.total = sum(s.nbytes for s in specs)
        self.offset = 0
        self._hash = hashlib.sha256(self.header)

    def header_message(self) -> dict[str, Any]:
        return {"t": "h", "hdr": self.header, "total": self.total, "alg": HASH}

    def data_messages(self, data: bytes | bytearray | memoryview) -> Iterable[PackedBody]:
        """Chunk messages (pre-packed msgpack maps) for the next `data` bytes."""
        view = memoryview(data).cast("B")
        if self.offset + len(view) > self.total:
            raise TensorStreamError("more tensor data than the specs declare")
        for start in range(0, len(view), self.chunk_size):
            piece = view[start : start + self.chunk_size]
            offset = self.offset
            self.offset += len(piece)
            # {"t": "c", "o": offset, "d": piece}, packed with one copy of the data
            body = b"".join([_CHUNK_HEAD, pack(offset), _DATA_KEY, bin_header(len(piece)), piece])
            digest = hashlib.sha256(body).digest()
            self._hash.update(digest)
            yield PackedBody(body, digest)

    def end_message(self) -> dict[str, Any]:
        if self.offset != self.total:
            raise TensorStreamError(f"sent {self.offset} of {self.total} declared bytes")
        return {"t": "e", "digest": self._hash.digest()}


@dataclass(frozen=True, slots=True)
class TensorStart:
    spec: TensorSpec


@dataclass(frozen=True, slots=True)
class TensorData:
    spec: TensorSpec
    offset: int  # within this tensor's bytes
    data: memoryview


@dataclass(frozen=True, slots=True)
class TensorEnd:
    spec: TensorSpec


@dataclass(frozen=True, slots=True)
class StreamEnd:
    digest: bytes
    total: int


TensorEvent = TensorStart | TensorData | TensorEnd | StreamEnd


class TensorStreamDecoder:
    """Validates stream messages and turns them into per-tensor events."""

    def __init__(self, max_total: int) -> None:
        self.max_total = max_total
        self.specs: list[TensorSpec] | None = None
        self.total = 0
        self.offset = 0
        self.done = False
        self._hash = hashlib.sha256()
        self._index = 0  # current tensor
        self._in_tensor = 0  # bytes of the current tensor seen
        self._started = False  # TensorStart emitted for the current tensor

    def feed(self, msg: Any, body_sha256: bytes | None = None) -> list[TensorEvent]:
        """Consume one message: a decoded map, or its msgpack bytes.

        `body_sha256` is the SHA-256 of the message's msgpack bytes when the
        transport already computed it (a verified envelope's body digest).
        """
        if self.done:
            raise TensorStreamError("message after the end of the tensor stream")
        if isinstance(msg, PackedBody):  # straight from an encoder
            msg, body_sha256 = msg.data, body_sha256 or msg.sha256
        if isinstance(msg, bytes | bytearray | memoryview):
            raw = bytes(msg)
            body_sha256 = body_sha256 or hashlib.sha256(raw).digest()
            try:
                msg = msgpack.unpackb(raw, raw=False)
            except Exception:
                raise TensorStreamError("tensor stream message is not valid msgpack") from None
        if not isinstance(msg, dict) or msg.get("t") not in ("h", "c", "e"):
            raise TensorStreamError("not a tensor stream message")
        kind = msg["t"]
        if self.specs is None:
            if kind != "h":
                raise TensorStreamError("tensor stream must start with a header")
            return self._on_header(msg)
        if kind == "c":
            if body_sha256 is None:  # a decoded map: re-encode it canonically
                try:
                    body_sha256 = hashlib.sha256(msgpack.packb(msg, use_bin_type=True)).digest()
                except Exception:
                    raise TensorStreamError("malformed chunk message") from None
            return self._on_chunk(msg, body_sha256)
        if kind == "e":
            return self._on_end(msg)
        raise TensorStreamError("duplicate tensor stream header")

    def _on_header(self, msg: dict[str, Any]) -> list[TensorEvent]:
        hdr, total, alg = msg.get("hdr"), msg.get("total"), msg.get("alg")
        if alg != HASH:
            raise TensorStreamError(f"unsupported integrity hash {alg!r}")
        if not isinstance(hdr, bytes) or len(hdr) > MAX_HEADER:
            raise TensorStreamError("tensor stream header must be bytes within the limit")
        if type(total) is not int or not 0 <= total <= self.max_total:
            raise TensorStreamError(f"tensor stream of {total!r} bytes exceeds the limit")
        try:
            header = json.loads(hdr)
        except (ValueError, UnicodeDecodeError):
            raise TensorStreamError("tensor stream header is not valid JSON") from None
        try:
            specs = parse_specs(header, max_size=self.max_total)
        except TensorCodecError as exc:
            raise TensorStreamError(str(exc)) from None
        if sum(s.nbytes for s in specs) != total:
            raise TensorStreamError("declared total does not match the tensor specs")
        self.specs, self.total = specs, total
        self._hash.update(hdr)
        return self._advance([])

    def _advance(self, events: list[TensorEvent]) -> list[TensorEvent]:
        """Emit start/end events for tensors at the current position (incl. empty ones)."""
        assert self.specs is not None
        while self._index < len(self.specs):
            spec = self.specs[self._index]
            if not self._started:
                events.append(TensorStart(spec))
                self._started = True
            if self._in_tensor < spec.nbytes:
                break
            events.append(TensorEnd(spec))
            self._index += 1
            self._in_tensor = 0
            self._started = False
        return events

    def _on_chunk(self, msg: dict[str, Any], body_sha256: bytes) -> list[TensorEvent]:
        assert self.specs is not None
        data, off = msg.get("d"), msg.get("o")
        if not isinstance(data, bytes) or off != self.offset or type(off) is not int:
            raise TensorStreamError(f"chunk at offset {off!r}, expected {self.offset}")
        if self.offset + len(data) > self.total:
            raise TensorStreamError("more tensor data than the header declares")
        self._hash.update(body_sha256)
        self.offset += len(data)
        events: list[TensorEvent] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            spec = self.specs[self._index]
            take = min(spec.nbytes - self._in_tensor, len(view) - pos)
            events.append(TensorData(spec, self._in_tensor, view[pos : pos + take]))
            self._in_tensor += take
            pos += take
            self._advance(events)
        return events

    def _on_end(self, msg: dict[str, Any]) -> list[TensorEvent]:
        if self.offset != self.total:
            raise TensorStreamError(f"stream ended after {self.offset} of {self.total} bytes")
        digest = self._hash.digest()
        if msg.get("digest") != digest:
            raise TensorStreamError("tensor stream digest mismatch")
        self.done = True
        return [StreamEnd(digest, self.total)]


def tensor_messages(
    tensors: Mapping[str, Any], *, chunk_size: int = DEFAULT_CHUNK
) -> Iterable[dict[str, Any] | PackedBody]:
    """Stream messages for in-memory tensors (numpy arrays or torch tensors)."""
    parts = [spec_and_bytes(name, value) for name, value in tensors.items()]
    enc = TensorStreamEncoder([s for s, _ in parts], chunk_size=chunk_size)
    yield enc.header_message()
    for _, raw in parts:
        yield from enc.data_messages(raw)
    yield enc.end_message()


async def send_tensor_stream(
    send: Callable[[Any], Awaitable[None]],
    specs: list[TensorSpec],
    data: Iterable[bytes | memoryview] | AsyncIterable[bytes | memoryview],
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> bytes:
    """Send `specs` and their concatenated bytes (produced lazily by `data`); returns digest.

    `send` is e.g. `ctx.send` of a server-stream handler, so each message waits
    for flow-control credit and memory stays bounded by the chunk size.
    """
    enc = TensorStreamEncoder(specs, chunk_size=chunk_size)
    await send(enc.header_message())
    if isinstance(data, AsyncIterable):
        async for piece in data:
            for msg in enc.data_messages(piece):
                await send(msg)
    else:
        for piece in data:
            for msg in enc.data_messages(piece):
                await send(msg)
    end = enc.end_message()
    await send(end)
    return end["digest"]


async def send_tensors(
    send: Callable[[Any], Awaitable[None]],
    tensors: Mapping[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> None:
    for msg in tensor_messages(tensors, chunk_size=chunk_size):
        await send(msg)


def _source(messages: AsyncIterable[Any]) -> AsyncIterable[Any]:
    """Raw (body, digest) items when the transport offers them, else decoded maps."""
    raw_items = getattr(messages, "raw_items", None)
    return raw_items() if callable(raw_items) else messages


def _feed(dec: TensorStreamDecoder, item: Any) -> list[TensorEvent]:
    if isinstance(item, tuple):
        body, digest = item
        return dec.feed(body, digest)
    return dec.feed(item)


async def iter_tensor_events(
    messages: AsyncIterable[Any], *, max_total: int
) -> AsyncIterator[TensorEvent]:
    """Events for a tensor stream, validated as they come; memory stays per-chunk."""
    dec = TensorStreamDecoder(max_total)
    async for item in _source(messages):
        for ev in _feed(dec, item):
            yield ev
        if dec.done:
            return
    raise TensorStreamError("tensor stream ended before its end message")


async def receive_tensors(
    messages: AsyncIterable[Any], *, max_total: int, framework: str = "numpy"
) -> dict[str, Any]:
    """Assemble a whole tensor stream into arrays (allocated after the header checks)."""
    out: dict[str, Any] = {}
    buffers: dict[str, np.ndarray] = {}
    dec = TensorStreamDecoder(max_total)
    async for item in _source(messages):
        for ev in _feed(dec, item):
            if isinstance(ev, TensorStart):
                buffers[ev.spec.name] = np.empty(ev.spec.nbytes, dtype=np.uint8)
            elif isinstance(ev, TensorData):
                buf = buffers[ev.spec.name]
                buf[ev.offset : ev.offset + len(ev.data)] = np.frombuffer(ev.data, np.uint8)
            elif isinstance(ev, TensorEnd):
                out[ev.spec.name] = to_array(
                    ev.spec, buffers.pop(ev.spec.name).data, framework=framework
                )
        if dec.done:
            return out
    raise TensorStreamError("tensor stream ended before its end message")
