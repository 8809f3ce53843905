"""Request/response schemas: validate decoded msgpack against a declared type.

Any type pydantic understands works as a schema: a `BaseModel`, a dataclass, a
`TypedDict`, `bytes`, `dict[str, int]`... `None` means "no schema" (the raw
msgpack value is passed through). A body that does not validate is a
BAD_REQUEST error, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from knexa.net.rpc.errors import ErrorCode, RpcError


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


@dataclass(frozen=True, slots=True)
class PackedBody:
    """A body that is already msgpack: sent as is, without re-encoding or schema dumps.

    `sha256`, when its producer already computed it, spares the envelope a
    second pass over a large body.
    """

    data: bytes
    sha256: bytes | None = None


def pack_body(value: Any) -> bytes | PackedBody:
    """The msgpack body for `value` (a `PackedBody` passes through untouched)."""
    if isinstance(value, PackedBody):
        return value
    try:
        return msgpack.packb(to_wire(value), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RpcError(ErrorCode.BAD_REQUEST, f"body cannot be encoded: {exc}") from None


def unpack_body(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception as exc:
        raise RpcError(ErrorCode.BAD_REQUEST, f"body is not valid msgpack: {exc}") from None


@lru_cache(maxsize=512)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def to_wire(value: Any) -> Any:
    """Plain msgpack-able data for `value` (models and dataclasses are dumped)."""
    if isinstance(value, PackedBody):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    if hasattr(type(value), "__dataclass_fields__"):
        return _adapter(type(value)).dump_python(value, mode="python")
    return value


def validate(schema: Any, raw: Any, *, code: ErrorCode = ErrorCode.BAD_REQUEST) -> Any:
    """`raw` validated into `schema` (or unchanged when schema is None)."""
    if schema is None:
        return raw
    try:
        return _adapter(schema).validate_python(raw)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise RpcError(code, f"body does not match {getattr(schema, '__name__', schema)}: "
                       f"{detail}") from None
    except Exception as exc:  # a validator of the user's raising something else
        raise RpcError(code, f"body validation failed: {exc}") from None


def dump(schema: Any, value: Any) -> Any:
    """Wire form of `value` declared as `schema`."""
    if isinstance(value, PackedBody):
        return value
    if schema is None or isinstance(value, BaseModel):
        return to_wire(value)
    return _adapter(schema).dump_python(value, mode="python")
