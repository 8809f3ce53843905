"""The trio layer of NAT traversal: AutoNAT loop, relay service, reservations, relayed dials, DCUtR.

Policy decisions come from `knexa.net.nat.policy`; this module only does I/O.
Every network wait has a deadline; everything runs in the caller's nursery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from knexa.net.failures import failure_reason
from knexa.net.host import dialable_addrs
from knexa.net.nat.autonat import AutoNat
from knexa.net.nat.config import NatConfig
from knexa.net.nat.policy import (
    PRIVATE,
    PUBLIC,
    PunchScheduler,
    ReachabilityTracker,
    ReservationBook,
    circuit_addr,
    is_circuit,
    should_initiate_punch,
    worth_direct_dial,
)
from knexa.net.notifee import ConnectionNotifee

log = logging.getLogger("knexa.nat")
RESERVE_TIMEOUT_S = 10.0
RELAY_DIAL_TIMEOUT_S = 15.0
PUNCH_TIMEOUT_S = 60.0
AUTONAT_TIMEOUT_S = 20.0
AUTONAT_RETRY_S = 3.0  # while the status is unknown
DCUTR_DIAL_TIMEOUT_S = 3
ADDRS_CACHE_S = 2.0
RESERVATION_IDLE_S = 2.0  # while relays are wanted: identify may announce a new relay any time
# Without relays wanted, and without relayed peers to punch, the loops wait for a change
# (an AutoNAT verdict, a connection up or down); this bound only guards against a missed one.
QUIET_IDLE_S = 30.0


class _DrivenDCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR without its own driver loop (three tries every 2 s, then never again):
    the NatService decides when to punch and retries with backoff.

    Its first step, a plain dial of every address the peer announced, also waits out the dial
    timeout on the peer's private LAN addresses, which never answer from another LAN: here it
    dials only the addresses `worth_direct_dial` keeps, and none at all if none is left."""

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()

    async def _try_unilateral_upgrade(self, peer_id: PeerID) -> bool:
        try:
            known = [a for a in self.host.get_peerstore().addrs(peer_id) if not is_circuit(str(a))]
        except Exception:  # a peer the peerstore has never heard of
            return False
        own = [str(a) for a in dialable_addrs(self.host)]
        addrs = [a for a in known if worth_direct_dial(str(a), own)]
        if not addrs:
            return False
        with trio.move_on_after(self.dial_timeout):
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    nursery.start_soon(self._dial_peer, peer_id, addr)
        return await self._verify_direct_connection(peer_id)


class NatService:
    """Run with ``await nursery.start(service.run)`` inside a started host."""

    def __init__(
        self,
        host: IHost,
        mesh: Any,
        config: NatConfig,
        *,
        relay_candidates: Sequence[multiaddr.Multiaddr] = (),
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.mesh = mesh
        self.config = config.validate()
        self.own_id = str(host.get_id())
        self.on_change = on_change
        forced = None if config.reachability == "auto" else config.reachability
        self.tracker = ReachabilityTracker(forced=forced)
        self.book = ReservationBook()
        self.punches = PunchScheduler()
        self.autonat = AutoNat(host)
        self.limits = config.limits.to_libp2p()
        self.relay_protocol = CircuitV2Protocol(host, limits=self.limits, allow_hop=False)
        # STOP only: dialing through a relay must not also reserve a slot there.
        self.relay_transport = CircuitV2Transport(
            host, self.relay_protocol, RelayConfig(roles=RelayRole.STOP, limits=self.limits)
        )
        # A short dial timeout: DCUtR first tries the peer's known addresses directly, and a home
        # node's private addresses never answer from outside its LAN.
        self.dcutr = _DrivenDCUtR(host, dial_timeout=DCUTR_DIAL_TIMEOUT_S) if config.hole_punch == "on" else None
        self.relay_serving = False
        self.relay_candidates = [*(multiaddr.Multiaddr(a) for a in config.relays), *relay_candidates]
        self.punch_log: list[dict[str, Any]] = []
        self.relayed_dials = 0
        self._advertised: tuple[str, ...] = ()
        self._wake = trio.Event()
        self._connections_changed = trio.Event()

    # -- what others read -----------------------------------------------------
    @property
    def reachability(self) -> str:
        return self.tracker.status

    def circuit_addrs(self) -> list[str]:
        now = time.time()
        return [
            circuit_addr(e.relay_addr, e.relay, self.own_id)
            for e in self.book.active(now)
            if e.relay_addr
        ]

    def stats(self) -> dict[str, Any]:
        now = time.time()
        return {
            "reachability": self.reachability,
            "reachability_mode": self.config.reachability,
            "autonat_votes": self.tracker.counts(),
            "autonat_served": self.autonat.served,
            "relay_service": self.relay_serving,
            "relay_limits": {
                "max_reservations": self.config.limits.max_reservations,
                "reservation_ttl_s": self.config.limits.reservation_ttl_s,
                "max_circuit_duration_s": self.config.limits.max_circuit_duration_s,
                "max_circuit_bytes": self.config.limits.max_circuit_bytes,
            },
            "reservations": [
                {
                    "relay": e.relay,
                    "state": e.state,
                    "expires_in_s": round(e.expires_at - now, 1) if e.state == "active" else None,
                    "renew_in_s": round(e.next_at - now, 1),
                    "renewals": e.renewals,
                    "last_error": e.last_error,
                }
                for e in self.book.entries.values()
            ],
            "relay_addrs": self.circuit_addrs(),
            "hole_punch": self.config.hole_punch,
            "hole_punches": self.punch_log[-20:],
        }

    # -- lifecycle --------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.autonat.install()
        self._install_addr_advertiser()
        network = self.host.get_network()
        notifee = ConnectionNotifee(self._on_connection, self._on_connection)
        network.register_notifee(notifee)
        async with AsyncExitStack() as stack:
            remove = getattr(network, "remove_notifee", None)
            if remove is not None:
                stack.callback(remove, notifee)
            await stack.enter_async_context(background_trio_service(self.relay_protocol))
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
                with trio.fail_after(10):
                    await self.dcutr.event_started.wait()
            self._apply_relay_service()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._autonat_loop)
                nursery.start_soon(self._reservation_loop)
                if self.dcutr is not None:
                    nursery.start_soon(self._punch_loop)
                task_status.started()
                await trio.sleep_forever()

    def _on_connection(self, conn: Any) -> None:
        self._connections_changed.set()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as exc:  # a listener's failure must not stop NAT traversal
                log.warning('event=nat_listener_failed reason="%s"', exc)

    # -- AutoNAT ----------------------------------------------------------------
    def _autonat_servers(self) -> list[PeerID]:
        servers = []
        for conn in self.host.get_network().get_connections():
            addrs = [str(a) for a in (conn.get_transport_addresses() or [])]
            if addrs and not any(is_circuit(a) for a in addrs):
                peer = conn.muxed_conn.peer_id
                if peer not in servers:
                    servers.append(peer)
        return servers[:5]

    async def _autonat_loop(self) -> None:
        while True:
            if self.config.reachability == "auto":
                before = self.tracker.status
                servers = self._autonat_servers()
                addrs = [multiaddr.Multiaddr(str(a).split("/p2p/")[0]) for a in dialable_addrs(self.host)]
                for server in servers:
                    try:
                        outcome = await self.autonat.ask(server, addrs, timeout_s=AUTONAT_TIMEOUT_S)
                    except Exception as exc:  # no verdict from this server (old node, gone, slow)
                        log.debug('event=autonat_no_answer server=%s reason="%s"', server, failure_reason(exc))
                        continue
                    self.tracker.record(str(server), outcome, time.time())
                    log.debug("event=autonat_verdict server=%s outcome=%s", server, outcome)
                status = self.tracker.decide(time.time())
                if status != before:
                    log.info("event=reachability status=%s votes=%s", status, self.tracker.counts())
                    self._apply_relay_service()
                    self._wake.set()
                    self._changed()
            delay = AUTONAT_RETRY_S if self.tracker.status not in (PUBLIC, PRIVATE) else self.config.autonat_interval_s
            await trio.sleep(delay)

    def _apply_relay_service(self) -> None:
        mode = self.config.relay_service
        want = mode == "on" or (mode == "auto" and self.tracker.status == PUBLIC)
        if want == self.relay_serving:
            return
        if want:
            # CircuitV2Protocol registers its HOP handler only at start; toggling it at run
            # time lets a node become a relay when AutoNAT finds it public.
            self.host.set_stream_handler(HOP_PROTOCOL, self.relay_protocol._handle_hop_stream)
        else:
            self.host.remove_stream_handler(HOP_PROTOCOL)
        self.relay_serving = want
        log.info("event=relay_service enabled=%s", want)

    # -- reservations -----------------------------------------------------------
    def _want_relays(self) -> bool:
        return self.tracker.status == PRIVATE or (bool(self.config.relays) and self.tracker.status != PUBLIC)

    def _candidate_relays(self) -> list[tuple[str, str]]:
        """(relay peer id, relay address) pairs: configured relays, then bootstrap peers and other
        peers we dialed that announce the relay (HOP) protocol, then bootstrap peers that do not
        (yet: a relay in "auto" mode starts serving once it finds itself public)."""
        store = self.host.get_peerstore()

        def offers_relay(peer: str) -> bool:
            try:
                return HOP_PROTOCOL in store.get_protocols(PeerID.from_base58(peer))
            except Exception:  # identify has not told us yet
                return False

        configured: list[tuple[str, str]] = []
        for addr in self.relay_candidates:
            try:
                info = info_from_p2p_addr(addr)
            except Exception:  # noqa: S112 - validated at config time; skip anything odd
                continue
            configured.append((str(info.peer_id), str(addr).split("/p2p/")[0]))
        explicit = configured[: len(self.config.relays)]
        bootstrap = configured[len(self.config.relays):]
        others = [
            (p.peer_id, p.address.split("/p2p/")[0])
            for p in self.mesh.peers()
            if not is_circuit(p.address) and p.direction == "outbound" and offers_relay(p.peer_id)
        ]
        ordered = explicit + [b for b in bootstrap if offers_relay(b[0])] + others + bootstrap
        result: list[tuple[str, str]] = []
        for relay, addr in ordered:
            if relay != self.own_id and all(relay != r for r, _ in result):
                result.append((relay, addr))
        return result

    async def _reservation_loop(self) -> None:
        while True:
            now = time.time()
            if self._want_relays():
                self.book.track(self._candidate_relays(), self.config.max_relays, now)
            else:
                for relay in list(self.book.entries):
                    self.book.drop(relay)
            for relay in self.book.due(now):
                await self._reserve(relay)
            advertised = tuple(self.circuit_addrs())
            if advertised != self._advertised:
                self._advertised = advertised
                log.info("event=relay_addrs addrs=%s", ",".join(advertised) or "none")
                self._changed()
            idle_s = RESERVATION_IDLE_S if self._want_relays() else QUIET_IDLE_S
            wake_at = min(self.book.next_wakeup(time.time(), idle_s=idle_s), time.time() + idle_s)
            self._wake = trio.Event()
            with trio.move_on_at(trio.current_time() + max(0.05, wake_at - time.time())):
                await self._wake.wait()

    async def _reserve(self, relay: str) -> None:
        entry = self.book.entries[relay]
        peer = PeerID.from_base58(relay)
        renewing = entry.state == "active"
        stream = None
        try:
            with trio.fail_after(RESERVE_TIMEOUT_S):
                if not self.host.get_network().get_connections(peer) and entry.relay_addr:
                    await self.mesh.connect(multiaddr.Multiaddr(f"{entry.relay_addr}/p2p/{relay}"))
                stream = await self.host.new_stream(peer, [HOP_PROTOCOL])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_delimited_msg(stream, HopMessage)
            status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.UNUSED
            if status != StatusCode.OK or not reply.HasField("reservation"):
                raise ConnectionError(f"relay refused the reservation ({status.name})")
            expires = float(reply.reservation.expire)
            now = time.time()
            if expires <= now:
                raise ConnectionError("relay granted an already expired reservation")
            renew_at = self.book.reserved(relay, expires, now)
            log.info(
                "event=%s relay=%s ttl_s=%.0f renew_in_s=%.0f",
                "reservation_renewed" if renewing else "reserved", relay, expires - now, renew_at - now,
            )
        except Exception as exc:
            reason = failure_reason(exc) if not isinstance(exc, trio.TooSlowError) else "no answer in time"
            retry_at = self.book.failed(relay, reason, time.time())
            # Warn on the first failure and now and then, not on every retry.
            failures = self.book.entries[relay].failures
            log.log(
                logging.WARNING if failures % 10 == 1 else logging.DEBUG,
                'event=reservation_failed relay=%s reason="%s" attempts=%d retry_in_s=%.1f',
                relay, reason, failures, retry_at - time.time(),
            )
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:  # noqa: S110 - best effort
                        pass

    def _install_addr_advertiser(self) -> None:
        """Make identify (and so peers' peerstores and the DHT) carry our /p2p-circuit addresses:
        py-libp2p keeps a reservation to itself and never advertises it."""
        original = self.host.get_addrs
        cache: list[Any] = [None, 0.0, []]  # (circuit addresses, when, result)

        def get_addrs() -> list[multiaddr.Multiaddr]:
            # py-libp2p calls this for every pubsub RPC it sends (to sign a peer record), and
            # building the list (multiaddr parsing) cost more than the RPC itself: reuse it while
            # our circuit addresses are unchanged, and rebuild it every ADDRS_CACHE_S for the
            # listen and observed addresses, which change rarely.
            circuits = tuple(self.circuit_addrs())
            now = time.monotonic()
            if cache[0] == circuits and now - cache[1] < ADDRS_CACHE_S:
                return list(cache[2])
            # A wildcard listen address (0.0.0.0) in identify makes peers dial themselves;
            # announce the interface addresses instead.
            addrs = [a for a in original() if not str(a).startswith(("/ip4/0.0.0.0/", "/ip6/::/"))]
            for addr in dialable_addrs(self.host):
                if addr not in addrs and not str(addr).startswith(("/ip4/127.", "/ip6/::1/")):
                    addrs.append(addr)
            for text in circuits:
                addr = multiaddr.Multiaddr(text)
                if addr not in addrs:
                    addrs.append(addr)
            cache[:] = [circuits, now, addrs]
            return list(addrs)

        self.host.get_addrs = get_addrs  # type: ignore[method-assign]

    # -- relayed dials ----------------------------------------------------------
    async def connect_relayed(self, peer: PeerID, addrs: Sequence[str]) -> str:
        """Dial `peer` through one of its circuit addresses; returns the one used. Raises ConnectionError."""
        errors = []
        for text in addrs:
            if not is_circuit(text) or not text.endswith(f"/p2p/{peer}"):
                continue
            addr = multiaddr.Multiaddr(text)
            relay_part = text.split("/p2p-circuit")[0]
            try:
                with trio.fail_after(RELAY_DIAL_TIMEOUT_S):
                    relay_info = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
                    if not self.host.get_network().get_connections(relay_info.peer_id):
                        await self.mesh.connect(multiaddr.Multiaddr(relay_part))
                    await self.relay_transport.dial(addr)
                self.relayed_dials += 1
                log.info("event=relayed_dial peer=%s via=%s", peer, relay_info.peer_id)
                return text
            except Exception as exc:
                reason = failure_reason(exc) if not isinstance(exc, trio.TooSlowError) else "no answer in time"
                errors.append(f"{relay_part}: {reason}")
        raise ConnectionError("; ".join(errors) or f"no circuit address for {peer}")

    # -- hole punching ----------------------------------------------------------
    def _relayed_only(self) -> dict[str, bool | None]:
        """Peers we reach only through a relay -> whether that relayed connection is inbound."""
        # Runs on every connection change: walk the swarm's own map, no peer-id parsing.
        result: dict[str, bool | None] = {}
        for pid, conns in self.host.get_network().get_connections_map().items():
            addrs = [str(a) for c in conns for a in (c.get_transport_addresses() or [])]
            if addrs and all(is_circuit(a) for a in addrs):
                direction = str(getattr(conns[0], "direction", "")).lower()
                result[str(pid)] = True if "inbound" in direction else False if "outbound" in direction else None
        return result

    async def _punch_loop(self) -> None:
        assert self.dcutr is not None
        while True:
            # Only a connection change or a due retry can give this loop work: sleep until one.
            self._connections_changed = trio.Event()
            now = time.time()
            relayed = self._relayed_only()
            for peer in list(self.punches.peers):
                if peer not in relayed:
                    self.punches.gone(peer)
            for peer in relayed:
                self.punches.relayed(peer, now)
            for peer in self.punches.due(now):
                state = self.punches.peers[peer]
                if not should_initiate_punch(self.own_id, peer, relayed.get(peer)) and state.attempts < 2:
                    # The other side drives; after two of its turns, we try too (it may run no DCUtR driver).
                    self.punches.result(peer, False, now)
                    continue
                await self._punch(peer)
            next_at = self.punches.next_due()
            timeout_s = QUIET_IDLE_S if next_at is None else min(QUIET_IDLE_S, max(0.05, next_at - time.time()))
            with trio.move_on_after(timeout_s):
                await self._connections_changed.wait()

    async def _punch(self, peer: str) -> None:
        assert self.dcutr is not None
        pid = PeerID.from_base58(peer)
        # py-libp2p stops after 3 attempts per connection; our scheduler owns retries.
        self.dcutr._hole_punch_attempts.pop(pid, None)
        started = time.perf_counter()
        ok = False
        reason = "timeout"
        with trio.move_on_after(PUNCH_TIMEOUT_S):
            try:
                ok = bool(await self.dcutr.initiate_hole_punch(pid))
                reason = "ok" if ok else "no direct connection"
            except Exception as exc:
                reason = failure_reason(exc)
        elapsed = time.perf_counter() - started
        retry_at = self.punches.result(peer, ok, time.time())
        self.punch_log.append({"peer": peer, "ok": ok, "seconds": round(elapsed, 3), "at": time.time(),
                               "reason": reason,
                               "retry_in_s": None if retry_at is None else round(retry_at - time.time(), 1)})
        if ok:
            log.info("event=hole_punched peer=%s seconds=%.3f", peer, elapsed)
        else:
            log.info(
                'event=hole_punch_failed peer=%s reason="%s" seconds=%.3f retry_in_s=%.0f',
                peer, reason, elapsed, (retry_at or time.time()) - time.time(),
            )
