"""Discovery over the Kademlia DHT: signed records, providers, peer routing.

    discovery = Discovery(host, key_pair, server=True, bootstrap=["/ip4/.../p2p/..."])
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run)          # or: async with discovery.running():
        await discovery.announce_model("smollm2-135m", weights_hash)
        peers = await discovery.find_model("smollm2-135m", limit=5, timeout=10)
        await discovery.put_record("peer", b"...")  # /knexa/peer/<own peer id>
        rec = await discovery.get_record(other_peer_id, "peer")
        await discovery.connect_peer(other_peer_id)

Pure parts (no sockets): `keys` (record and content keys), `envelope` (signed
record format, validation, selection), `providers` (deduplication), `lookup`
(the iterative Kademlia walk), `logs` (the DHT stream-close log filter).
Networking: `rpc` (Kademlia wire client), `core`, `record_ops`, `service`.
"""

from knexa.dht.config import DiscoveryConfig, DiscoveryError
from knexa.dht.envelope import RecordError, SignedRecord, sign_record, verify_record
from knexa.dht.keys import DhtKeyError, adapter_key, model_key, prefix_key, record_key
from knexa.dht.providers import PeerDict
from knexa.dht.service import Discovery

__all__ = [
    "DhtKeyError",
    "Discovery",
    "DiscoveryConfig",
    "DiscoveryError",
    "PeerDict",
    "RecordError",
    "SignedRecord",
    "adapter_key",
    "model_key",
    "prefix_key",
    "record_key",
    "sign_record",
    "verify_record",
]
