"""Sans-IO framing: a 4-byte big-endian length prefix, then a msgpack array.

Frame payloads are ``[type, call_id, ...]``. Signed frames carry an envelope
(see `envelope`); control frames (cancel, credit) are unsigned because they
carry no application data and only ever act on the authenticated connection
they arrive on.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

import msgpack

from knexa.net.rpc.errors import CodecError, FrameTooLarge
from knexa.net.rpc.packing import array_header, bin_header, pack

PREFIX = struct.Struct(">I")
PREFIX_SIZE = PREFIX.size


class FrameType(IntEnum):
    OPEN = 1  # [1, call_id, recv_window, envelope]: opens a call
    ITEM = 2  # [2, call_id, envelope]: one streamed message
    CLOSE = 3  # [3, call_id, envelope]: the client has no more items
    RESPONSE = 4  # [4, call_id, envelope]: final response or error; ends the call
    CANCEL = 5  # [5, call_id]: the client gave up on the call
    CREDIT = 6  # [6, call_id, nbytes]: the receiver grants more send credit


SIGNED_TYPES = frozenset({FrameType.OPEN, FrameType.ITEM, FrameType.CLOSE, FrameType.RESPONSE})


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    call_id: int
    envelope: bytes = b""  # signed frames
    value: int = 0  # OPEN: receive window; CREDIT: bytes granted


def _u64(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**64:
        raise CodecError(f"{what} must be an unsigned 64-bit integer")
    return value


def encode_frame(frame: Frame) -> bytes:
    """Length prefix plus payload, ready for the wire (one copy of the envelope)."""
    t = frame.type
    if t is FrameType.OPEN:
        parts = [array_header(4), pack(int(t)), pack(frame.call_id), pack(frame.value),
                 bin_header(len(frame.envelope)), frame.envelope]
    elif t in SIGNED_TYPES:
        parts = [array_header(3), pack(int(t)), pack(frame.call_id),
                 bin_header(len(frame.envelope)), frame.envelope]
    elif t is FrameType.CREDIT:
        parts = [array_header(3), pack(int(t)), pack(frame.call_id), pack(frame.value)]
    else:
        parts = [array_header(2), pack(int(t)), pack(frame.call_id)]
    size = sum(map(len, parts))
    return b"".join([PREFIX.pack(size), *parts])


def decode_payload(payload: bytes | memoryview) -> Frame:
    """Decode one frame payload (without its prefix); raises `CodecError`."""
    try:
        items = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise CodecError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(items, list) or len(items) < 2:
        raise CodecError("frame must be an array [type, call_id, ...]")
    try:
        t = FrameType(items[0]) if type(items[0]) is int else None
    except ValueError:
        t = None
    if t is None:
        raise CodecError(f"unknown frame type {items[0]!r}")
    call_id = _u64(items[1], "call id")
    if t is FrameType.OPEN:
        if len(items) != 4 or not isinstance(items[3], bytes):
            raise CodecError("OPEN frame must be [1, call_id, window, envelope]")
        return Frame(t, call_id, items[3], _u64(items[2], "window"))
    if t in SIGNED_TYPES:
        if len(items) != 3 or not isinstance(items[2], bytes):
            raise CodecError(f"{t.name} frame must be [type, call_id, envelope]")
        return Frame(t, call_id, items[2])
    if t is FrameType.CREDIT:
        if len(items) != 3:
            raise CodecError("CREDIT frame must be [6, call_id, nbytes]")
        return Frame(t, call_id, value=_u64(items[2], "credit"))
    if len(items) != 2:
        raise CodecError("CANCEL frame must be [5, call_id]")
    return Frame(t, call_id)


class FrameDecoder:
    """Accumulates bytes and cuts them into frame payloads.

    The length prefix is checked against `max_frame_size` before any byte of
    the payload is buffered, so an oversized announcement costs nothing.
    Received chunks are kept as they came and joined once per frame, so a
    large frame arriving in many reads is copied once.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._chunks: deque[bytes] = deque()
        self._off = 0  # consumed bytes of _chunks[0]
        self._size = 0  # unconsumed bytes in total

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
            self._size += len(data)

    @property
    def buffered(self) -> int:
        return self._size

    def _peek(self, n: int) -> bytes:
        out = bytearray()
        off = self._off
        for chunk in self._chunks:
            out += chunk[off : off + n - len(out)]
            off = 0
            if len(out) >= n:
                break
        return bytes(out)

    def _frame_length(self) -> int | None:
        if self._size < PREFIX_SIZE:
            return None
        first = self._chunks[0]
        if len(first) - self._off >= PREFIX_SIZE:
            (length,) = PREFIX.unpack_from(first, self._off)
        else:  # the prefix straddles chunks
            (length,) = PREFIX.unpack(self._peek(PREFIX_SIZE))
        if length > self.max_frame_size:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the limit of {self.max_frame_size}"
            )
        return length

    def _take(self, n: int) -> bytes:
        """Consume and return the next `n` buffered bytes (n <= buffered)."""
        self._size -= n
        parts: list[bytes | memoryview] = []
        while n:
            chunk = self._chunks[0]
            avail = len(chunk) - self._off
            if avail <= n:
                parts.append(chunk if self._off == 0 else memoryview(chunk)[self._off :])
                self._chunks.popleft()
                self._off = 0
                n -= avail
            else:
                parts.append(memoryview(chunk)[self._off : self._off + n])
                self._off += n
                n = 0
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def needed(self) -> int:
        """Bytes still missing for the next frame to be complete (0 if one is ready)."""
        length = self._frame_length()
        if length is None:
            return PREFIX_SIZE - self._size
        return max(0, PREFIX_SIZE + length - self._size)

    def next_payload(self) -> bytes | None:
        """The next complete payload, or None; raises `FrameTooLarge`."""
        length = self._frame_length()
        if length is None or self._size < PREFIX_SIZE + length:
            return None
        self._take(PREFIX_SIZE)
        return self._take(length) if length else b""

    def next_frame(self) -> Frame | None:
        payload = self.next_payload()
        return None if payload is None else decode_payload(payload)
