"""Sans-IO framing: a 4-byte big-endian length prefix, then a msgpack array.

Frame payloads are ``[type, call_id, ...]``. Signed frames carry an envelope
(see `envelope`); control frames (cancel, credit) are unsigned because they
carry no application data and only ever act on the authenticated connection
they arrive on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import msgpack

from knexa.net.rpc.errors import CodecError, FrameTooLarge

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
    """Length prefix plus payload, ready for the wire."""
    t = frame.type
    if t is FrameType.OPEN:
        items: list[object] = [int(t), frame.call_id, frame.value, frame.envelope]
    elif t in SIGNED_TYPES:
        items = [int(t), frame.call_id, frame.envelope]
    elif t is FrameType.CREDIT:
        items = [int(t), frame.call_id, frame.value]
    else:
        items = [int(t), frame.call_id]
    payload = msgpack.packb(items, use_bin_type=True)
    return PREFIX.pack(len(payload)) + payload


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
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def needed(self) -> int:
        """Bytes still missing for the next frame to be complete (0 if one is ready)."""
        avail = self.buffered
        if avail < PREFIX_SIZE:
            return PREFIX_SIZE - avail
        (length,) = PREFIX.unpack_from(self._buf, self._pos)
        return max(0, PREFIX_SIZE + length - avail)

    def next_payload(self) -> bytes | None:
        """The next complete payload, or None; raises `FrameTooLarge`."""
        avail = len(self._buf) - self._pos
        if avail < PREFIX_SIZE:
            return None
        (length,) = PREFIX.unpack_from(self._buf, self._pos)
        if length > self.max_frame_size:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the limit of {self.max_frame_size}"
            )
        end = self._pos + PREFIX_SIZE + length
        if end > len(self._buf):
            return None
        with memoryview(self._buf) as view:
            payload = bytes(view[self._pos + PREFIX_SIZE : end])
        self._pos = end
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return payload

    def next_frame(self) -> Frame | None:
        payload = self.next_payload()
        return None if payload is None else decode_payload(payload)
