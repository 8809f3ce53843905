"""Node configuration: defaults, a TOML file, then command-line flags on top."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from knexa.net.host import AddressError, parse_multiaddr
from knexa.net.nat.config import NatConfig, NatConfigError, RelayLimitsConfig
from knexa.node.dtypes import DTYPES
from knexa.node.kvshare.settings import KvShareSettings
from knexa.node.learn.settings import LearnSettings

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
DEFAULT_API_PORT = 7700
CONFIG_FILE = "config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The configuration (file or flags) is invalid; the message says where."""


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("knexa-node", appauthor=False))


@dataclass
class NodeConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    bootstrap: list[str] = field(default_factory=list)
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    log_level: str = "info"
    ping_interval_s: float = 5.0
    # "embedded" (the shipped SmolLM2), a Hugging Face model folder, or "none"
    model: str = "embedded"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: bfloat16 on CUDA; on CPU whichever of float32 and bfloat16 decodes faster here (measured once).
    # Nodes check each other's answers and share KV caches only at the same dtype: set it alike to be sure.
    dtype: str = "auto"
    # DHT server mode answers other peers' queries; a node that others cannot
    # dial (behind a NAT) should run as a client. "auto" follows AutoNAT: a server
    # until AutoNAT finds the node private.
    dht_mode: str = "auto"
    # converted models are cached here, shared by every node of this user
    cache_dir: Path = field(default_factory=default_data_dir)
    # collaboration (knexa.node.collab): admission bound on alpha*((K+1)*M+1)*lambda, queue cap, checks
    collab_bound: float = 0.8
    collab_max_queue: int = 8
    collab_admission: str = "on"  # on, off (off only to show what the control prevents)
    verify_fraction: float = 0.1  # share of peers' answers from our own model that we re-score
    skills: str = ""  # skill vector for task beacons, "math=0.9,code=0.4", each in [0, 1]
    # learning together (knexa.node.learn): distillation rounds between nodes that ran `knexa-node learn`;
    # each learn_<name> is LearnSettings.<name>, described there
    learn_round_deadline_s: float = LearnSettings.round_deadline_s
    learn_round_interval_s: float = LearnSettings.round_interval_s
    learn_takeover_s: float = LearnSettings.takeover_s
    learn_member_ttl_s: float = LearnSettings.member_ttl_s
    learn_transfer_prompts: int = LearnSettings.transfer_prompts
    learn_max_tokens: int = LearnSettings.max_tokens
    learn_teacher_votes: int = LearnSettings.teacher_votes
    learn_local_steps: int = LearnSettings.local_steps
    learn_round_steps: int = LearnSettings.round_steps
    learn_lr: float = LearnSettings.lr
    learn_latency_target_s: float = LearnSettings.latency_target_s
    learn_min_training_share: float = LearnSettings.min_training_share
    learn_public_validation: int = LearnSettings.public_validation
    learn_task_family: str = LearnSettings.task_family
    learn_transfer_file: str = LearnSettings.transfer_file
    # each kv_<name> is KvShareSettings.<name>, described there
    kv_store_bytes: int = KvShareSettings.store_bytes
    kv_block: int = KvShareSettings.block
    kv_max_blocks: int = KvShareSettings.max_blocks
    kv_fetch: str = KvShareSettings.fetch
    kv_min_prefix_tokens: int = KvShareSettings.min_prefix_tokens
    kv_lookup_timeout_s: float = KvShareSettings.lookup_timeout_s
    kv_unmeasured_fetch_timeout_s: float = KvShareSettings.unmeasured_fetch_timeout_s
    kv_max_fetch_bytes: int = KvShareSettings.max_fetch_bytes
    kv_providers_tried: int = KvShareSettings.providers_tried
    # NAT traversal (knexa.net.nat): AutoNAT decides reachability unless forced
    reachability: str = "auto"  # auto, public, private
    relay_service: str = "auto"  # auto (serve once public), on, off
    relays: list[str] = field(default_factory=list)  # relays to reserve on, besides bootstrap peers
    max_relays: int = 2
    hole_punch: str = "on"  # on, off
    relay_max_reservations: int = 64
    relay_reservation_ttl_s: int = 3600
    relay_max_circuit_duration_s: int = 3600
    relay_max_circuit_bytes: int = 256 * 1024 * 1024

    def nat_config(self) -> NatConfig:
        return NatConfig(
            reachability=self.reachability,
            relay_service=self.relay_service,
            relays=tuple(self.relays),
            max_relays=self.max_relays,
            hole_punch=self.hole_punch,
            limits=RelayLimitsConfig(
                max_reservations=self.relay_max_reservations,
                reservation_ttl_s=self.relay_reservation_ttl_s,
                max_circuit_duration_s=self.relay_max_circuit_duration_s,
                max_circuit_bytes=self.relay_max_circuit_bytes,
            ),
        )

    def validate(self) -> NodeConfig:
        if not self.listen:
            raise ConfigError("at least one listen address is required")
        try:
            for text in self.listen:
                parse_multiaddr(text)
            for text in self.bootstrap:
                parse_multiaddr(text, need_peer_id=True)
            for text in self.relays:
                parse_multiaddr(text, need_peer_id=True)
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api_port {self.api_port} is not a TCP port")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.ping_interval_s <= 0:
            raise ConfigError("ping_interval_s must be positive")
        if self.model not in ("embedded", "none") and not Path(self.model).expanduser().is_dir():
            raise ConfigError(f"model {self.model!r} is not 'embedded', 'none' or a model folder")
        if self.dht_mode not in ("auto", "server", "client"):
            raise ConfigError(f"dht_mode must be auto, server or client, not {self.dht_mode!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        try:
            self.nat_config().validate()
        except NatConfigError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 < self.collab_bound <= 1:
            raise ConfigError("collab_bound must be in (0, 1]")
        if self.collab_max_queue < 1:
            raise ConfigError("collab_max_queue must be at least 1")
        if self.collab_admission not in ("on", "off"):
            raise ConfigError(f"collab_admission must be on or off, not {self.collab_admission!r}")
        if not 0 <= self.verify_fraction <= 1:
            raise ConfigError("verify_fraction must be in [0, 1]")
        for name in ("learn_round_interval_s", "learn_round_deadline_s", "learn_takeover_s", "learn_member_ttl_s",
                     "learn_latency_target_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if not 0 <= self.learn_round_interval_s <= self.learn_round_deadline_s * 100:
            raise ConfigError("learn_round_interval_s is out of range")
        if not 1 <= self.learn_transfer_prompts <= 256 or not 1 <= self.learn_max_tokens <= 1024:
            raise ConfigError("learn_transfer_prompts must be in 1..256 and learn_max_tokens in 1..1024")
        if not 1 <= self.learn_teacher_votes <= 15:
            raise ConfigError("learn_teacher_votes must be in 1..15")
        if self.learn_local_steps < 1 or self.learn_round_steps < 1 or not 0 < self.learn_lr < 1:
            raise ConfigError("learn_local_steps and learn_round_steps must be at least 1, learn_lr in (0, 1)")
        if not 0 <= self.learn_min_training_share < 1:
            raise ConfigError("learn_min_training_share must be in [0, 1)")
        if not 0 <= self.learn_public_validation <= 256:
            raise ConfigError("learn_public_validation must be in 0..256")
        from knexa.node.learn.tasks import FAMILIES, DataError, load_prompts

        if self.learn_task_family not in FAMILIES:
            raise ConfigError(f"learn_task_family must be one of {', '.join(FAMILIES)}, "
                              f"not {self.learn_task_family!r}")
        if self.learn_transfer_file:
            try:
                load_prompts(Path(self.learn_transfer_file))
            except DataError as exc:
                raise ConfigError(f"learn_transfer_file: {exc}") from None
        try:
            self.kvshare_settings().validate()
        except ValueError as exc:
            raise ConfigError(f"kv_{exc}") from None
        try:
            self.skill_vector()
        except ValueError as exc:
            raise ConfigError(f"skills: {exc}") from None
        return self

    def learn_settings(self) -> LearnSettings:
        return LearnSettings(**self._prefixed("learn_"))

    def kvshare_settings(self) -> KvShareSettings:
        return KvShareSettings(**self._prefixed("kv_"))

    def _prefixed(self, prefix: str) -> dict[str, Any]:
        return {f.name.removeprefix(prefix): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(prefix)}

    def skill_vector(self) -> dict[str, float]:
        from knexa.node.collab.vote import parse_requirement

        vector = parse_requirement(self.skills)
        if any(v > 1 for v in vector.values()):
            raise ValueError("each skill must be in [0, 1]")
        return vector


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def _coerce(name: str, value: Any) -> Any:
    expected = NodeConfig.__dataclass_fields__[name].type
    if name in ("data_dir", "cache_dir"):
        return Path(value).expanduser()
    if expected == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return value
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer")
        return value
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value


def load_config(
    config_file: Path | None = None,
    data_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> NodeConfig:
    """Defaults < config file < flags. Flags given as None are not set.

    The file is `config_file` if given, else `<data dir>/config.toml` if present.
    """
    values: dict[str, Any] = {}
    base_dir = data_dir if data_dir is not None else default_data_dir()
    path = config_file if config_file is not None else base_dir / CONFIG_FILE
    if config_file is not None or path.exists():
        values.update(_read_toml(path))
    for name, value in (overrides or {}).items():
        if value is not None and value != []:
            values[name] = value
    if data_dir is not None:
        values["data_dir"] = data_dir
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
    config = NodeConfig(**{name: _coerce(name, v) for name, v in values.items()})
    return config.validate()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    # Accept both a flat file and one with a [node] table.
    node = data.get("node", data)
    if not isinstance(node, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return {k.replace("-", "_"): v for k, v in node.items()}
