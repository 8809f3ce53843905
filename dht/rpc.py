"""Client side of the Kademlia wire protocol (py-libp2p's protobuf messages).

The server side is py-libp2p's own KadDHT stream handler. This client exists so
that lookups can be driven by `knexa.dht.lookup` (which counts hops honestly,
never answers from a stale local cache and deduplicates), and so that every
request has a deadline. One request per stream, as the py-libp2p server expects.
"""

from __future__ import annotations

from contextlib import suppress

import trio
import varint
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

ADDR_TTL = 3600


class RpcError(Exception):
    """A DHT request to one peer failed (unreachable, timed out, bad reply)."""


class KadClient:
    def __init__(self, host: IHost, timeout: float = 5.0) -> None:
        self.host = host
        self.timeout = timeout

    async def _request(self, peer: PeerID, msg: Message) -> Message:
        stream = None
        try:
            with trio.fail_after(self.timeout):
                stream = await self._open_stream(peer)
                envelope, _ = env_to_send_in_RPC(self.host)
                msg.senderRecord = envelope
                data = msg.SerializeToString()
                await stream.write(varint.encode(len(data)) + data)
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
                reply = Message()
                reply.ParseFromString(raw)
        except trio.TooSlowError:
            await _abort(stream)
            raise RpcError(f"{peer}: no reply within {self.timeout}s") from None
        except Exception as exc:
            await _abort(stream)
            raise RpcError(f"{peer}: {type(exc).__name__}: {exc}") from None
        await _close(stream)
        if reply.type != msg.type:
            raise RpcError(f"{peer}: reply of type {reply.type} to a request of {msg.type}")
        maybe_consume_signed_record(reply, self.host, peer)
        return reply

    async def _open_stream(self, peer: PeerID) -> INetStream:
        # py-libp2p can leave a connection unusable but listed, for example
        # after a stream negotiation on it was cancelled (a lookup that has its
        # answer cancels the queries still in flight); new_stream then fails
        # at once without dialling. Dropping the connection and dialling again
        # tells a live peer from a gone one, within the request's deadline.
        try:
            return await self.host.new_stream(peer, [PROTOCOL_ID])
        except Exception:
            pass
        with suppress(Exception):
            await self.host.disconnect(peer)
        return await self.host.new_stream(peer, [PROTOCOL_ID])

    def _learn(self, peers: object) -> list[PeerInfo]:
        """PeerInfos from a repeated Message.Peer field, stored in the peerstore."""
        out: list[PeerInfo] = []
        local = self.host.get_id()
        store = self.host.get_peerstore()
        for proto in peers:  # type: ignore[attr-defined]
            try:
                pid = PeerID(proto.id)
            except Exception:
                continue
            if not proto.id or pid == local:
                continue
            maybe_consume_signed_record(proto, self.host)
            addrs: list[Multiaddr] = []
            for raw in proto.addrs:
                try:
                    addrs.append(Multiaddr(raw))
                except Exception:
                    continue
            if addrs:
                store.add_addrs(pid, addrs, ADDR_TTL)
            else:
                try:
                    addrs = list(store.addrs(pid))
                except Exception:
                    addrs = []
            out.append(PeerInfo(pid, addrs))
        return out

    def _closer(self, reply: Message) -> list[PeerID]:
        return [p.peer_id for p in self._learn(reply.closerPeers) if p.addrs]

    async def find_node(self, peer: PeerID, key: bytes) -> list[PeerInfo]:
        msg = Message(type=Message.MessageType.FIND_NODE, key=key)
        reply = await self._request(peer, msg)
        return [p for p in self._learn(reply.closerPeers) if p.addrs]

    async def get_providers(self, peer: PeerID, key: bytes) -> tuple[list[PeerInfo], list[PeerID]]:
        msg = Message(type=Message.MessageType.GET_PROVIDERS, key=key)
        reply = await self._request(peer, msg)
        return self._learn(reply.providerPeers), self._closer(reply)

    async def get_value(self, peer: PeerID, key: bytes) -> tuple[bytes | None, list[PeerID]]:
        msg = Message(type=Message.MessageType.GET_VALUE, key=key)
        reply = await self._request(peer, msg)
        value = reply.record.value if reply.HasField("record") and reply.record.value else None
        return value, self._closer(reply)

    async def put_value(self, peer: PeerID, key: bytes, value: bytes) -> bool:
        """True when `peer` stored the value (it echoes); False when it refused."""
        msg = Message(type=Message.MessageType.PUT_VALUE, key=key)
        msg.record.CopyFrom(Record(key=key, value=value))
        try:
            reply = await self._request(peer, msg)
        except RpcError:
            return False
        return reply.key == key

    async def add_provider(self, peer: PeerID, key: bytes) -> bool:
        """True when `peer` acknowledged the provider record (py-libp2p echoes it)."""
        msg = Message(type=Message.MessageType.ADD_PROVIDER, key=key)
        me = msg.providerPeers.add()
        me.id = self.host.get_id().to_bytes()
        me.addrs.extend(a.to_bytes() for a in self.host.get_addrs())
        try:
            reply = await self._request(peer, msg)
        except RpcError:
            return False
        return reply.key == key


async def _abort(stream: object) -> None:
    if stream is None:
        return
    with trio.move_on_after(1):
        try:
            await stream.reset()  # type: ignore[attr-defined]
        except Exception:
            pass


async def _close(stream: object) -> None:
    if stream is None:
        return
    with trio.move_on_after(1):
        try:
            await stream.close()  # type: ignore[attr-defined]
        except Exception:
            pass
