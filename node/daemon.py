"""The knexa-node daemon: one libp2p host, the mesh view and the local API, under trio."""

from __future__ import annotations

import errno
import fcntl
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from libp2p.peer.id import ID as PeerID

from knexa.crdt.entry import Entry
from knexa.crdt.ledger import Ledger
from knexa.crdt.namespace import profile_key
from knexa.crdt.profile import CapabilityProfile, Device, Load, Reachability
from knexa.crdt.store import LedgerStore
from knexa.dht import Discovery
from knexa.net.host import NetworkStopped, build_host, close_host, dialable_addrs, parse_multiaddr, watch_network
from knexa.net.identity import load_or_create_identity, peer_id_of
from knexa.net.mesh import Mesh
from knexa.net.nat.echo import register_echo
from knexa.net.nat.service import NatService
from knexa.net.pubsub import open_pubsub
from knexa.net.rpc import RpcService
from knexa.net.traffic import TrafficCounter
from knexa.net.version import AGENT_VERSION, KNEXA_VERSION
from knexa.node.api import create_app
from knexa.node.collab.service import CollabService, CollabSettings
from knexa.node.collab.verify import VerifyPolicy
from knexa.node.config import NodeConfig
from knexa.node.errors import describe, find_exception
from knexa.node.inference_wire import register_no_engine
from knexa.node.ledger_service import LedgerService
from knexa.node.ledger_view import entry_view, profile_summary
from knexa.node.metrics import NodeMetrics
from knexa.node.paths import LOCK_FILE, STATE_FILE, TOKEN_FILE, write_json_atomically

if TYPE_CHECKING:
    from knexa.node.inference import InferenceService
    from knexa.node.kvshare.exchange import KvExchange
    from knexa.node.kvshare.service import KvShareService
    from knexa.node.learn.service import LearnService

log = logging.getLogger("knexa.daemon")

# A node whose network stopped under it is restarted in place this often within the window, then left to stop.
RESTARTS = 3
RESTART_WINDOW_S = 600.0
RESTART_DELAY_S = 1.0



class DaemonError(Exception):
    """A condition that stops the daemon from starting; the message is for the user."""


def load_or_create_token(data_dir: Path) -> str:
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token


class _DataDirLock:
    """One daemon per data directory: a second would fight over identity and state."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"another knexa-node daemon is already running with data dir {self._path.parent}"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _tcp_endpoint(addr: multiaddr.Multiaddr) -> tuple[int, str, int] | None:
    protocols = [p.name for p in addr.protocols()]
    if "tcp" not in protocols:
        return None
    if "ip4" in protocols:
        return socket.AF_INET, addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))
    if "ip6" in protocols:
        return socket.AF_INET6, addr.value_for_protocol("ip6"), int(addr.value_for_protocol("tcp"))
    return None


def check_can_listen(addr: multiaddr.Multiaddr) -> None:
    """Fail early with the OS's reason: py-libp2p only logs a failed listen and runs on."""
    endpoint = _tcp_endpoint(addr)
    if endpoint is None:
        raise DaemonError(f"cannot listen on {addr}: only /ip4 or /ip6 TCP addresses are supported")
    family, ip, port = endpoint
    if port == 0:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise DaemonError(f"cannot listen on {addr}: {reason}") from None


class Daemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _DataDirLock(config.data_dir)
        self.key_pair = load_or_create_identity(config.data_dir)
        self.peer_id = str(peer_id_of(self.key_pair))
        self.api_token = load_or_create_token(config.data_dir)
        self.traffic = TrafficCounter()
        self.listen_addrs = [parse_multiaddr(a) for a in config.listen]
        self.bootstrap_addrs = [parse_multiaddr(a, need_peer_id=True) for a in config.bootstrap]
        self.host = build_host(self.key_pair, self.listen_addrs, self.traffic)
        self.mesh = Mesh(self.host, self.bootstrap_addrs, ping_interval_s=config.ping_interval_s)
        self.started_at = time.time()
        self.metrics = NodeMetrics(self.mesh, self.traffic, self.started_at)
        self.rpc = RpcService(self.host, self.key_pair)
        self.rpc.register_metrics(self.metrics.registry)
        self.discovery = Discovery(
            self.host, self.key_pair, server=_dht_server(config), bootstrap=self.bootstrap_addrs
        )
        self.rpc.resolve_peer = self._resolve_peer
        register_echo(self.rpc)
        # After a hole punch, new RPC streams go over the direct connection, not the relay.
        self.mesh.upgrade_listeners.append(lambda peer: self.rpc.retire_sessions(PeerID.from_base58(peer)))
        self.nat = NatService(
            self.host,
            self.mesh,
            config.nat_config(),
            relay_candidates=self.bootstrap_addrs,
            on_change=self._nat_changed,
        )
        self.ledger: Ledger | None = None
        self.ledger_service: LedgerService | None = None
        self.inference: InferenceService | None = None
        self.kvshare: KvShareService | None = None  # prefix-cache sharing, on nodes that run a model
        self.kvexchange: KvExchange | None = None  # fused caches and text hints between different models
        self.learn: LearnService | None = None  # learning together, on nodes that run a model
        if config.model != "none":
            # torch and transformers take seconds to import: only for nodes that run a model.
            from knexa.node.engine import EngineConfig
            from knexa.node.inference import InferenceService

            engine_config = EngineConfig(
                model=None if config.model == "embedded" else Path(config.model).expanduser(),
                data_dir=config.cache_dir,
                device=None if config.device == "auto" else config.device,
                dtype=config.dtype,
                show_progress=False,
            )
            self.inference = InferenceService(engine_config, self.rpc, on_change=self._profile_changed)
            from knexa.node.kvshare.service import KvShareService

            self.kvshare = KvShareService(self.rpc, self.discovery, self.inference.require_engine,
                                          config.kvshare_settings())
            from knexa.node.kvshare.exchange import KvExchange

            self.kvexchange = KvExchange(self.rpc, self.inference.require_engine, config.cache_dir / "fusers")
            from knexa.node.learn.service import LearnService

            self.learn = LearnService(
                self.rpc, self.key_pair, self.peer_id, self.inference.require_engine, lambda: self.ledger,
                self._announce, config.data_dir, self._learned_skills, config.learn_settings(),
            )
        else:
            register_no_engine(self.rpc, self.peer_id)
        self.collab = CollabService(
            self.rpc, self.peer_id, self.inference, lambda: self.ledger, self._publish_report,
            lambda: [p.peer_id for p in self.mesh.peers()],
            CollabSettings(
                bound=config.collab_bound, max_queue=config.collab_max_queue,
                admission=config.collab_admission == "on", verify=VerifyPolicy(fraction=config.verify_fraction),
                skills=config.skill_vector(),
            ),
        )
        self.collab.register_metrics(self.metrics.registry)
        self.api_url = ""
        self._nursery: trio.Nursery | None = None
        self._network_stopped: NetworkStopped | None = None

    # -- what the API and CLI show ------------------------------------------
    def own_profile(self) -> CapabilityProfile:
        parts = self.inference.profile_parts() if self.inference is not None else {}
        device = parts.pop("device", Device(backend="cpu"))
        engine_queue = parts["load"].queue_length if "load" in parts else 0
        admission = self.collab.admission
        parts["load"] = Load(queue_length=engine_queue + admission.queue_length,
                             admitted_rate=admission.admitted_rate(trio.current_time()))
        parts["skills"] = tuple(sorted(self.collab.settings.skills.items()))
        return CapabilityProfile(
            device=Device(device.backend, device.gpu_name, _total_memory(), device.gpu_memory_bytes),
            reachability=Reachability(status=self.nat.reachability, relay_addrs=tuple(self.nat.circuit_addrs())),
            **parts,
        )

    def _profile_changed(self) -> None:
        if self.ledger_service is not None:
            self.ledger_service.refresh_profile()
        status = self.inference.status() if self.inference is not None else {}
        model = status.get("model")
        if status.get("state") == "ready" and model and self._nursery is not None:
            self._nursery.start_soon(self._announce_model, model["name"], model["weights_sha256"])

    def _nat_changed(self) -> None:
        # Reachability or relay addresses changed: republish the profile that carries them.
        if self.ledger_service is not None:
            self.ledger_service.refresh_profile()
        if self.config.dht_mode == "auto" and self.nat.reachability in ("public", "private"):
            # Others cannot dial a private node to query it: it stops serving the DHT.
            self.discovery.set_server(self.nat.reachability == "public")

    def _publish_report(self, subject: str, score: float, reason: str) -> None:
        """A signed reputation report about a peer, into the ledger and out to the mesh."""
        if self.ledger is not None and self.ledger_service is not None:
            self.ledger_service.announce([self.ledger.put_report(subject, score, reason)])

    def _announce(self, entries: list[Entry]) -> None:
        if self.ledger_service is not None:
            self.ledger_service.announce(entries)

    def _learned_skills(self, skills: dict[str, float]) -> None:
        """Skills measured on the node's own validation data join (and override) the configured ones."""
        self.collab.settings.skills.update(skills)
        if self.ledger_service is not None:
            self.ledger_service.refresh_profile()

    def report_peer(self, subject: str, score: float, reason: str) -> Entry:
        """An operator's report about a peer: signed, stored and spread like the node's own."""
        assert self.ledger is not None and self.ledger_service is not None
        entry = self.ledger.put_report(subject, score, reason)
        self.ledger_service.announce([entry])
        return entry

    async def _resolve_peer(self, peer: PeerID) -> None:
        """Addresses for a peer we are not connected to: through its relay if its profile says it
        is private, else the peerstore's, else the DHT's."""
        profile = self.ledger.profiles().get(str(peer)) if self.ledger is not None else None
        if profile is not None and profile.reachability.status == "private" and profile.reachability.relay_addrs:
            try:
                await self.nat.connect_relayed(peer, profile.reachability.relay_addrs)
                return
            except ConnectionError as exc:
                log.info('event=relayed_dial_failed peer=%s reason="%s"', peer, exc)
        try:
            if self.host.get_peerstore().addrs(peer):
                return
        except Exception:  # py-libp2p raises for a peer it has never heard of
            pass
        await self.discovery.connect_peer(peer, timeout=10)

    async def _announce_model(self, name: str, weights_hash: str) -> None:
        try:
            accepted = await self.discovery.announce_model(name, weights_hash)
            log.info("event=model_announced model=%s providers_accepted=%d", name, accepted)
        except Exception as exc:  # no DHT peers yet: the discovery re-announces periodically
            log.debug('event=model_announce_failed model=%s reason="%s"', name, exc)

    def require_inference(self) -> InferenceService:
        if self.inference is None:
            from knexa.node.engine import EngineDown

            raise EngineDown("this node runs no model (started with model = none)")
        return self.inference

    def peers_view(self) -> list[dict[str, Any]]:
        profiles = self.ledger.profiles() if self.ledger is not None else {}
        return [
            {**p.to_dict(), "profile": profile_summary(profiles.get(p.peer_id))}
            for p in self.mesh.peers()
        ]

    def known_peers_view(self) -> list[dict[str, Any]]:
        """Peers with a live ledger profile that this node holds no connection to: the rest of the mesh,
        reachable on demand (collaboration dials them)."""
        if self.ledger is None:
            return []
        connected = {p.peer_id for p in self.mesh.peers()} | {self.peer_id}
        known = []
        for peer, profile in self.ledger.profiles().items():
            entry = self.ledger.entry(profile_key(peer))
            if peer in connected or entry is None:
                continue
            known.append({"peer_id": peer, "profile": profile_summary(profile), "updated_at": entry.wall_ms / 1000})
        return sorted(known, key=lambda k: -k["updated_at"])

    def ledger_view(self, author: str | None = None) -> dict[str, Any]:
        assert self.ledger is not None and self.ledger_service is not None
        entries = [e for e in self.ledger.entries() if author is None or e.author == author]
        return {"entries": [entry_view(e) for e in entries], "stats": self.ledger_service.stats()}

    def node_info(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "version": KNEXA_VERSION,
            "agent": AGENT_VERSION,
            "listen_addrs": [str(a) for a in dialable_addrs(self.host)],
            "observed_addrs": self.mesh.observed_addrs(),
            "api": self.api_url,
            "uptime_s": round(time.time() - self.started_at, 3),
            "started_at": self.started_at,
            "peers_connected": len(self.mesh.table),
            "bootstrap": [str(a) for a in self.bootstrap_addrs],
            "bytes_in": self.traffic.bytes_in,
            "bytes_out": self.traffic.bytes_out,
            "streams_open": self.mesh.streams_open(),
            "ledger": self.ledger_service.stats() if self.ledger_service is not None else None,
            "dht": self.discovery.stats(),
            "collab": self.collab.stats(),
            "engine": _engine_summary(self.inference.status()) if self.inference is not None else None,
            "nat": self.nat.stats(),
            "learn": self.learn.status() if self.learn is not None else None,
        }

    # -- lifecycle -----------------------------------------------------------
    async def say_goodbye(self) -> None:
        """Before a clean stop, while every connection is still up: retract this node's profile (and its
        learning membership), so that peers stop choosing it at once instead of when the records expire
        (bounded; a crash skips it, and the records just expire)."""
        if self.ledger is None or self.ledger_service is None:
            return
        entries = [self.ledger_service.retract_profile()]
        if self.learn is not None:
            entries += self.learn.leave()
        await self.ledger_service.say_goodbye(entries)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Raises DaemonError if the node cannot start, NetworkStopped if its libp2p
        network stops under it."""
        self._lock.acquire()
        try:
            for addr in self.listen_addrs:
                check_can_listen(addr)
            self.ledger = Ledger(self.key_pair, store=LedgerStore.in_data_dir(self.config.data_dir))
            await self._run_host(task_status)
        finally:
            (self.config.data_dir / STATE_FILE).unlink(missing_ok=True)
            if self.ledger is not None:
                self.ledger.close()
            self._lock.release()

    async def _run_host(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with self.host.run(self.listen_addrs):
                try:
                    self._check_listening()
                    async with open_pubsub(self.host) as pubsub:
                        try:
                            await self._run_services(pubsub, task_status)
                        finally:
                            # Connections go first: protocol services that stop while
                            # peers still open streams to them make py-libp2p raise.
                            await close_host(self.host)
                finally:
                    await close_host(self.host)
        except BaseException as exc:
            # Leaving host.run() re-raises the swarm task's failure that stopped the network, in place of ours.
            stopped = self._network_stopped
            if stopped is None or find_exception(exc, (NetworkStopped, trio.Cancelled, KeyboardInterrupt)):
                raise
            raise stopped from exc

    async def _run_services(self, pubsub: Any, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_network)
            await nursery.start(self.mesh.run)
            await nursery.start(self.rpc.run)
            await nursery.start(self.nat.run)
            # Not awaited: bootstrapping the DHT may wait on unreachable peers.
            nursery.start_soon(self.discovery.run)
            assert self.ledger is not None
            self.ledger_service = LedgerService(self.ledger, self.rpc, pubsub, self.mesh, self.own_profile)
            await nursery.start(self.ledger_service.run)
            binds = await nursery.start(self._serve_api)
            self.api_url = binds[0]
            # After the API has bound: a start that fails must not first wait for a model load.
            if self.inference is not None:
                await nursery.start(self.inference.run)
            if self.kvshare is not None:
                await nursery.start(self.kvshare.run)
            await nursery.start(self.collab.run)
            if self.learn is not None:
                await nursery.start(self.learn.run)
            self._write_state()
            log.info(
                "event=started peer=%s listen=%s api=%s",
                self.peer_id,
                ",".join(str(a) for a in dialable_addrs(self.host)),
                self.api_url,
            )
            task_status.started()

    async def _watch_network(self) -> None:
        try:
            await watch_network(self.host)
        except NetworkStopped as exc:
            log.error('event=network_stopped peer=%s reason="%s"', self.peer_id, exc)
            self._network_stopped = exc
            raise

    def _check_listening(self) -> None:
        bound = self.host.get_transport_addrs()
        if len(bound) < len(self.listen_addrs):
            raise DaemonError(
                "cannot listen on "
                + ", ".join(str(a) for a in self.listen_addrs)
                + f" (bound only {', '.join(str(a) for a in bound) or 'nothing'})"
            )

    async def _serve_api(self, *, task_status: trio.TaskStatus[list[str]]) -> None:
        host, port = self.config.api_host, self.config.api_port
        if not _is_loopback(host):
            log.warning("event=api_public host=%s reason=configured_explicitly", host)
        config = HypercornConfig()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 1.0
        try:
            # FastAPI keeps every endpoint it classified in process-wide caches (fastapi.dependencies.models),
            # so the app's routes see the daemon through a weak proxy: a stopped daemon must be freed (a node
            # that restarts in place makes a new one in the same process).
            await serve(create_app(weakref.proxy(self)), config, task_status=task_status)
        except BaseException as exc:
            os_error = find_exception(exc, OSError)
            if os_error is None:
                raise
            reason = "address already in use" if os_error.errno == errno.EADDRINUSE else os_error.strerror
            raise DaemonError(f"cannot serve the local API on {host}:{port}: {reason}") from None

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "api": self.api_url,
            "listen_addrs": [str(a) for a in dialable_addrs(self.host)],
        }
        write_json_atomically(self.config.data_dir / STATE_FILE, state)


def _dht_server(config: NodeConfig) -> bool:
    """DHT server mode at start: "auto" serves unless the node is configured as private
    (then AutoNAT's verdicts switch it as they come)."""
    return config.dht_mode == "server" or (config.dht_mode == "auto" and config.reachability != "private")


def _engine_summary(status: dict[str, Any]) -> dict[str, Any]:
    model = status.get("model") or {}
    return {
        "state": status.get("state"),
        "reason": status.get("reason"),
        "model": model.get("name"),
        "device": status.get("device"),
        "dtype": status.get("dtype"),
        "queue_length": status.get("queue_length"),
        "tokens_per_s": status.get("tokens_per_s"),
        "requests_served": status.get("requests_served"),
    }


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def run_until_signal(new_daemon: Callable[[], Daemon]) -> None:
    """Run a daemon in the foreground; SIGINT or SIGTERM stops it cleanly. A daemon whose libp2p network
    stopped under it (see `watch_network`) is replaced by a fresh one from `new_daemon`: same data directory,
    identity, ledger and enrolment, new connections. Past `RESTARTS` within `RESTART_WINDOW_S` it gives up
    with a DaemonError, for whatever supervises the process."""
    restarts: list[float] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        while True:
            daemon = new_daemon()
            try:
                await _run_until_signal(daemon, signals)
                return
            except BaseException as exc:  # noqa: BLE001 - only a stopped network is handled; the rest re-raised
                stopped = find_exception(exc, NetworkStopped)
                if stopped is None:
                    raise
            now = trio.current_time()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
            if len(restarts) >= RESTARTS:
                raise DaemonError(f"{stopped}, {len(restarts) + 1} times within {RESTART_WINDOW_S / 60:.0f} "
                                  "minutes; not restarting again")
            restarts.append(now)
            cause = describe(stopped.__cause__) if stopped.__cause__ is not None else "none reported"
            log.warning('event=restarting peer=%s reason="%s" cause="%s" delay_s=%s', daemon.peer_id, stopped,
                        cause, RESTART_DELAY_S)
            # The stopped node's model goes before the next one loads its own, so that memory need not hold
            # two (the exception's traceback holds the old node's frames too).
            del daemon, stopped
            gc.collect()
            await trio.sleep(RESTART_DELAY_S)


async def _run_until_signal(daemon: Daemon, signals: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)

        async def stop_on_signal() -> None:
            async for signum in signals:
                log.info("event=stopping signal=%s", signal.Signals(signum).name)
                await daemon.say_goodbye()
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(stop_on_signal)
    log.info("event=stopped peer=%s", daemon.peer_id)
