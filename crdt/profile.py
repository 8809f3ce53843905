"""The capability profile a node publishes about itself: what it runs and how well.

Versioned by `schema_version`. Every class converts to and from plain
msgpack-able dicts, and `from_dict` validates everything it reads, because the
dicts come from other peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from knexa.crdt.entry import canonical_packb, unpack_payload
from knexa.crdt.schema import (
    SchemaError,
    as_dict,
    check_choice,
    get_float,
    get_int,
    get_list,
    get_str,
    get_str_list,
)

SCHEMA_VERSION = 1
BACKENDS = frozenset({"cpu", "cuda", "mps", "rocm"})
REACHABILITY = frozenset({"public", "private", "unknown"})
MAX_MODELS = 64
MAX_ADAPTERS = 256
MAX_SKILLS = 256
MAX_RELAY_ADDRS = 16
MAX_TAGS = 32


class ProfileError(ValueError):
    """A profile dict is invalid or from an unsupported schema."""


@dataclass(frozen=True)
class Device:
    backend: str = "cpu"
    gpu_name: str = ""
    memory_bytes: int = 0
    gpu_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "gpu_name": self.gpu_name,
            "memory_bytes": self.memory_bytes,
            "gpu_memory_bytes": self.gpu_memory_bytes,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Device:
        d = as_dict(raw, "device")
        return cls(
            backend=check_choice(get_str(d, "backend"), "backend", BACKENDS),
            gpu_name=get_str(d, "gpu_name"),
            memory_bytes=get_int(d, "memory_bytes"),
            gpu_memory_bytes=get_int(d, "gpu_memory_bytes"),
        )


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float = 0.0
    mean_service_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": self.tokens_per_s, "mean_service_time_s": self.mean_service_time_s}

    @classmethod
    def from_dict(cls, raw: Any) -> Throughput:
        d = as_dict(raw, "throughput")
        return cls(get_float(d, "tokens_per_s"), get_float(d, "mean_service_time_s"))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    parameter_count: int
    tokenizer_hash: str
    weights_hash: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "parameter_count": self.parameter_count,
            "tokenizer_hash": self.tokenizer_hash,
            "weights_hash": self.weights_hash,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> ModelInfo:
        d = as_dict(raw, "model")
        return cls(
            name=get_str(d, "name", allow_empty=False),
            architecture=get_str(d, "architecture"),
            parameter_count=get_int(d, "parameter_count"),
            tokenizer_hash=get_str(d, "tokenizer_hash", 128),
            weights_hash=get_str(d, "weights_hash", 128),
            dtype=get_str(d, "dtype", 32),
        )


@dataclass(frozen=True)
class LoraAdapter:
    adapter_id: str
    base_model: str
    rank: int
    version: int
    domain_tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_id": self.adapter_id,
            "base_model": self.base_model,
            "rank": self.rank,
            "version": self.version,
            "domain_tags": list(self.domain_tags),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> LoraAdapter:
        d = as_dict(raw, "adapter")
        return cls(
            adapter_id=get_str(d, "adapter_id", allow_empty=False),
            base_model=get_str(d, "base_model"),
            rank=get_int(d, "rank", 1, 65536),
            version=get_int(d, "version"),
            domain_tags=tuple(get_str_list(d, "domain_tags", MAX_TAGS, 64)),
        )


@dataclass(frozen=True)
class Load:
    queue_length: int = 0
    admitted_rate: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"queue_length": self.queue_length, "admitted_rate": self.admitted_rate}

    @classmethod
    def from_dict(cls, raw: Any) -> Load:
        d = as_dict(raw, "load")
        return cls(get_int(d, "queue_length"), get_float(d, "admitted_rate"))


@dataclass(frozen=True)
class Reachability:
    status: str = "unknown"
    relay_addrs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "relay_addrs": list(self.relay_addrs)}

    @classmethod
    def from_dict(cls, raw: Any) -> Reachability:
        d = as_dict(raw, "reachability")
        return cls(
            status=check_choice(get_str(d, "status"), "status", REACHABILITY),
            relay_addrs=tuple(get_str_list(d, "relay_addrs", MAX_RELAY_ADDRS, 512)),
        )


@dataclass(frozen=True)
class CapabilityProfile:
    device: Device = field(default_factory=Device)
    throughput: Throughput = field(default_factory=Throughput)
    models: tuple[ModelInfo, ...] = ()
    adapters: tuple[LoraAdapter, ...] = ()
    load: Load = field(default_factory=Load)
    reachability: Reachability = field(default_factory=Reachability)
    # score per task category, each in [0, 1]
    skills: tuple[tuple[str, float], ...] = ()
    schema_version: int = SCHEMA_VERSION

    def skill(self, category: str) -> float:
        return dict(self.skills).get(category, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "device": self.device.to_dict(),
            "throughput": self.throughput.to_dict(),
            "models": [m.to_dict() for m in self.models],
            "adapters": [a.to_dict() for a in self.adapters],
            "load": self.load.to_dict(),
            "reachability": self.reachability.to_dict(),
            "skills": dict(self.skills),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> CapabilityProfile:
        try:
            d = as_dict(raw, "profile")
            version = get_int(d, "schema_version", 1)
            if version != SCHEMA_VERSION:
                raise ProfileError(f"unsupported profile schema version {version}")
            return cls(
                schema_version=version,
                device=Device.from_dict(d.get("device")),
                throughput=Throughput.from_dict(d.get("throughput")),
                models=tuple(ModelInfo.from_dict(m) for m in get_list(d, "models", MAX_MODELS)),
                adapters=tuple(
                    LoraAdapter.from_dict(a) for a in get_list(d, "adapters", MAX_ADAPTERS)
                ),
                load=Load.from_dict(d.get("load")),
                reachability=Reachability.from_dict(d.get("reachability")),
                skills=_read_skills(d.get("skills")),
            )
        except SchemaError as exc:
            raise ProfileError(str(exc)) from None

    def to_payload(self) -> bytes:
        return canonical_packb(self.to_dict())


def _read_skills(raw: Any) -> tuple[tuple[str, float], ...]:
    skills = as_dict(raw, "skills")
    if len(skills) > MAX_SKILLS:
        raise SchemaError(f"at most {MAX_SKILLS} skills")
    if not all(isinstance(k, str) and 0 < len(k) <= 64 for k in skills):
        raise SchemaError("skill categories must be strings of 1-64 characters")
    return tuple(sorted((k, get_float(skills, k, 0.0, 1.0)) for k in skills))


def profile_from_payload(payload: bytes, *, allow_newer: bool = False) -> CapabilityProfile | None:
    """Parse a profile entry's payload; None for a newer schema when `allow_newer`."""
    try:
        raw = unpack_payload(payload)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProfileError("profile payload is not msgpack") from exc
    if allow_newer and isinstance(raw, dict):
        version = raw.get("schema_version")
        if type(version) is int and version > SCHEMA_VERSION:
            return None
    return CapabilityProfile.from_dict(raw)
