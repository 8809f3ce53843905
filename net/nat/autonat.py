"""AutoNAT dial-back over `/knexa/autonat/1.0.0` (libp2p AutoNAT v1 messages).

Why not py-libp2p's AutoNATService: its server dials back with `host.connect`,
which returns at once because the asking peer is already connected, so every
node would be told it is public. This server dials a *fresh* connection to the
requester's address and checks the peer id with a Noise handshake, then drops it.

Anti-amplification: the server only ever dials the IP it observes the request
coming from (an address with another IP is rewritten to the observed IP), at
most MAX_DIALS addresses, and refuses requests that arrive over a relay.
"""

from __future__ import annotations

import ipaddress
import logging

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID as PeerID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from knexa.net.failures import failure_reason
from knexa.net.nat.policy import DIAL_ERROR, DIAL_OK, DIAL_REFUSED, is_circuit

PROTOCOL_ID = "/knexa/autonat/1.0.0"
MAX_MESSAGE = 8 * 1024
MAX_DIALS = 4
DIAL_TIMEOUT_S = 5.0
# Dial-backs cost this node sockets and handshakes on a peer's say-so: at most this many at
# once, and one request per peer per interval (a client asks every few minutes at most).
MAX_CONCURRENT_DIALBACKS = 8
PER_PEER_INTERVAL_S = 10.0
log = logging.getLogger("knexa.nat.autonat")


def _ip_of(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(ipaddress.ip_address(addr.value_for_protocol(proto)))
        except Exception:  # noqa: S112 - not this protocol
            continue
    return None


def dial_candidates(raw_addrs: list[bytes], observed_ip: str) -> list[multiaddr.Multiaddr]:
    """TCP addresses to dial back, all on `observed_ip` (pure; exported for tests)."""
    family = "ip6" if ":" in observed_ip else "ip4"
    result: list[multiaddr.Multiaddr] = []
    for raw in raw_addrs:
        try:
            addr = multiaddr.Multiaddr(raw)
            port = int(addr.value_for_protocol("tcp"))
        except Exception:  # noqa: S112 - junk or non-TCP addresses are skipped
            continue
        if is_circuit(str(addr)) or not 0 < port < 65536:
            continue
        candidate = multiaddr.Multiaddr(f"/{family}/{observed_ip}/tcp/{port}")
        if candidate not in result:
            result.append(candidate)
        if len(result) >= MAX_DIALS:
            break
    return result


class AutoNat:
    """Serves dial-back requests and asks peers to dial us back."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.served = 0
        self.refused = 0
        self._slots = trio.Semaphore(MAX_CONCURRENT_DIALBACKS)
        self._last_request: dict[PeerID, float] = {}

    def install(self) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, self._handle)

    # -- server ------------------------------------------------------------
    async def _handle(self, stream: INetStream) -> None:
        try:
            with trio.move_on_after(DIAL_TIMEOUT_S * MAX_DIALS + 5):
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
                request = Message()
                request.ParseFromString(raw)
                response = await self._answer(request, stream)
                await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as exc:  # a broken request must not take the node down
            log.debug('event=autonat_request_failed reason="%s"', failure_reason(exc))
        finally:
            try:
                await stream.close()
            except Exception:  # the peer may be gone
                pass

    async def _answer(self, request: Message, stream: INetStream) -> Message:
        response = Message()
        response.type = Message.DIAL_RESPONSE
        conn = stream.muxed_conn
        addrs = [str(a) for a in (conn.get_transport_addresses() or [])] if hasattr(
            conn, "get_transport_addresses") else []
        remote = None
        try:
            remote = stream.get_remote_address()
        except Exception:  # noqa: S110 - no address means refuse below
            pass
        if request.type != Message.DIAL:
            response.dialResponse.status = Message.E_BAD_REQUEST
            return response
        if any(is_circuit(a) for a in addrs) or not remote:
            response.dialResponse.status = Message.E_DIAL_REFUSED
            response.dialResponse.statusText = "no dial-back over a relayed connection"
            return response
        try:
            peer = PeerID(request.dial.peer.id)
        except Exception:
            peer = None
        if peer is None or peer != conn.peer_id:
            response.dialResponse.status = Message.E_BAD_REQUEST
            response.dialResponse.statusText = "dial-back only for the asking peer"
            return response
        candidates = dial_candidates(list(request.dial.peer.addrs), str(ipaddress.ip_address(remote[0])))
        if not candidates:
            response.dialResponse.status = Message.E_DIAL_REFUSED
            response.dialResponse.statusText = "no TCP address to dial"
            return response
        now = trio.current_time()
        last = self._last_request.get(peer)
        if (last is not None and now - last < PER_PEER_INTERVAL_S) or self._slots.value == 0:
            self.refused += 1
            response.dialResponse.status = Message.E_DIAL_REFUSED
            response.dialResponse.statusText = "too many dial-back requests; ask again later"
            return response
        self._last_request[peer] = now
        if len(self._last_request) > 4096:  # forget the oldest: the map must not grow without bound
            for old in sorted(self._last_request, key=self._last_request.__getitem__)[:2048]:
                del self._last_request[old]
        self.served += 1
        async with self._slots:
            for addr in candidates:
                if await self._dial_fresh(addr, peer):
                    response.dialResponse.status = Message.OK
                    response.dialResponse.addr = addr.to_bytes()
                    return response
        response.dialResponse.status = Message.E_DIAL_ERROR
        response.dialResponse.statusText = "dial-back failed"
        return response

    async def _dial_fresh(self, addr: multiaddr.Multiaddr, peer: PeerID) -> bool:
        """A new TCP connection plus a Noise handshake that proves `peer` answered; then closed."""
        network = self.host.get_network()
        transport = network.transport_manager.transport_for_dialing(addr)  # type: ignore[attr-defined]
        if transport is None:
            return False
        raw = secured = None
        with trio.move_on_after(DIAL_TIMEOUT_S):
            try:
                raw = await transport.dial(addr)
                secured = await network.upgrader.upgrade_security(raw, True, peer)  # type: ignore[attr-defined]
                return True
            except Exception as exc:
                log.debug('event=autonat_dialback_failed addr=%s reason="%s"', addr, failure_reason(exc))
                return False
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    for conn in (secured, raw):
                        if conn is not None:
                            try:
                                await conn.close()
                            except Exception:  # noqa: S110 - best effort
                                pass
        return False

    # -- client ------------------------------------------------------------
    async def ask(self, server: PeerID, addrs: list[multiaddr.Multiaddr], timeout_s: float = 30.0) -> str:
        """Ask `server` to dial us back on `addrs`; returns DIAL_OK, DIAL_ERROR or DIAL_REFUSED.

        Raises on transport failure (no verdict)."""
        request = Message()
        request.type = Message.DIAL
        request.dial.peer.id = self.host.get_id().to_bytes()
        for addr in addrs:
            request.dial.peer.addrs.append(addr.to_bytes())
        stream = None
        try:
            with trio.fail_after(timeout_s):
                stream = await self.host.new_stream(server, [PROTOCOL_ID])
                await stream.write(encode_varint_prefixed(request.SerializeToString()))
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:  # noqa: S110
                        pass
        response = Message()
        response.ParseFromString(raw)
        status = response.dialResponse.status
        if status == Message.OK:
            return DIAL_OK
        if status == Message.E_DIAL_ERROR:
            return DIAL_ERROR
        return DIAL_REFUSED
