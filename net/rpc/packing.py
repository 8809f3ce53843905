"""msgpack pieces for building large messages with a single copy of their payload."""

from __future__ import annotations

import struct

import msgpack

_B8 = struct.Struct(">BB")
_B16 = struct.Struct(">BH")
_B32 = struct.Struct(">BI")


def bin_header(n: int) -> bytes:
    """The msgpack header of a bin object of `n` bytes."""
    if n < 256:
        return _B8.pack(0xC4, n)
    if n < 65536:
        return _B16.pack(0xC5, n)
    return _B32.pack(0xC6, n)


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return _B16.pack(0xDC, n)
    return _B32.pack(0xDD, n)


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)
