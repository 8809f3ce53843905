"""Named tensors on the wire in the safetensors layout; never unpickles.

Layout: u64 little-endian header length N, N bytes of JSON header
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}}``,
then the raw little-endian data. Files written here load with the
`safetensors` library and vice versa. Decoding checks every size against the
limit before it allocates, and returns zero-copy numpy views of the input.

numpy arrays are the native type; torch tensors are accepted (and produced on
request) when torch is importable, without torch being required.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from knexa.net.rpc.errors import CodecError

# safetensors dtype tag -> numpy dtype (little-endian). BF16 has no numpy type:
# it travels as raw 16-bit words and decodes to uint16 unless torch is asked for.
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TAGS = {dt: tag for tag, dt in DTYPES.items() if tag != "BF16"}
_TORCH_TAGS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}
_TORCH_NAMES = {tag: name for name, tag in _TORCH_TAGS.items()}
MAX_HEADER = 16 * 1024 * 1024
MAX_NDIM = 16


class TensorCodecError(CodecError):
    """Tensor bytes that are malformed or exceed a limit."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def spec_and_bytes(name: str, value: Any) -> tuple[TensorSpec, memoryview]:
    """The spec of `value` (numpy array or torch tensor) and its raw little-endian bytes."""
    if _is_torch(value):
        t = value.detach().to("cpu").contiguous()
        tag = _TORCH_TAGS.get(str(t.dtype).removeprefix("torch."))
        if tag is None:
            raise TensorCodecError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        import torch  # only reached when the caller already uses torch

        raw = t.reshape(-1).view(torch.uint8).numpy()
        return TensorSpec(name, tag, tuple(t.shape)), memoryview(raw)
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    tag = _NUMPY_TAGS.get(arr.dtype)
    if tag is None:
        raise TensorCodecError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return TensorSpec(name, tag, tuple(arr.shape)), memoryview(arr.reshape(-1).view(np.uint8))


def header_json(specs: list[TensorSpec]) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes


def encode_tensors(tensors: Mapping[str, Any]) -> bytes:
    """Serialise named tensors (numpy arrays or torch tensors) to safetensors bytes."""
    parts = [spec_and_bytes(name, value) for name, value in tensors.items()]
    header = header_json([spec for spec, _ in parts])
    return b"".join([struct.pack("<Q", len(header)), header, *(raw for _, raw in parts)])


def parse_specs(header: Any, *, max_size: int) -> list[TensorSpec]:
    """Validated specs (in data order) from a decoded safetensors JSON header."""
    if not isinstance(header, dict):
        raise TensorCodecError("tensor header must be a JSON object")
    entries: list[tuple[int, int, TensorSpec]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise TensorCodecError(f"tensor {name!r}: entry must be an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise TensorCodecError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d <= max_size for d in shape)):
            raise TensorCodecError(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise TensorCodecError(f"tensor {name!r}: bad data offsets {offs!r}")
        spec = TensorSpec(name, dtype, tuple(shape))
        if spec.nbytes > max_size or spec.nbytes != offs[1] - offs[0]:
            raise TensorCodecError(f"tensor {name!r}: size does not match its shape or limit")
        entries.append((offs[0], offs[1], spec))
    entries.sort(key=lambda e: e[0])
    expected = 0
    for begin, end, spec in entries:
        if begin != expected:
            raise TensorCodecError(f"tensor {spec.name!r}: data offsets overlap or leave gaps")
        expected = end
    if expected > max_size:
        raise TensorCodecError(f"tensor data of {expected} bytes exceeds the limit {max_size}")
    return [spec for _, _, spec in entries]


def decode_tensors(
    data: bytes | bytearray | memoryview, max_size: int, *, framework: str = "numpy"
) -> dict[str, Any]:
    """Tensors from safetensors bytes; raises `TensorCodecError` on bad or oversized input.

    The numpy results are read-only views of `data` (copy them to keep them
    beyond `data`'s lifetime or to write). `framework="torch"` returns torch
    tensors (and real bfloat16) when torch is installed.
    """
    view = memoryview(data).cast("B")
    if len(view) > max_size + MAX_HEADER + 8:
        raise TensorCodecError(f"{len(view)} bytes exceed the limit of {max_size}")
    if len(view) < 8:
        raise TensorCodecError("truncated tensor header length")
    (hlen,) = struct.unpack_from("<Q", view, 0)
    if hlen > min(MAX_HEADER, len(view) - 8):
        raise TensorCodecError(f"tensor header length {hlen} is invalid")
    try:
        header = json.loads(bytes(view[8 : 8 + hlen]))
    except (ValueError, UnicodeDecodeError):
        raise TensorCodecError("tensor header is not valid JSON") from None
    specs = parse_specs(header, max_size=max_size)
    body = view[8 + hlen :]
    total = sum(s.nbytes for s in specs)
    if total != len(body):
        raise TensorCodecError(f"tensor data is {len(body)} bytes, header says {total}")
    out: dict[str, Any] = {}
    offset = 0
    for s in specs:
        raw = body[offset : offset + s.nbytes]
        offset += s.nbytes
        out[s.name] = to_array(s, raw, framework=framework)
    return out


def to_array(spec: TensorSpec, raw: bytes | bytearray | memoryview, *,
             framework: str = "numpy") -> Any:
    """A tensor of `spec` over `raw` (zero-copy for numpy)."""
    arr = np.frombuffer(raw, dtype=DTYPES[spec.dtype]).reshape(spec.shape)
    if framework == "numpy":
        return arr
    if framework != "torch":
        raise ValueError(f"unknown framework {framework!r}")
    import torch

    dtype = getattr(torch, _TORCH_NAMES[spec.dtype])
    if arr.size == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(spec.shape)
