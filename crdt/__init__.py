"""The capability ledger: signed, expiring CRDT state shared by the mesh (sans-IO).

Driving it from the network layer (everything here is synchronous and pure,
except `LedgerStore`, which writes SQLite):

- Deltas: publish `encode_entry_batches([ledger.put_profile(p)])` on the ledger
  topic. Merge received messages in the topic validator, `merge_message(data)`,
  and reject the message if `rejected_by_reason` is not empty: GossipSub then
  does not forward it, so a forged entry stops at the first honest node.
  Entries that `merge` accepted from an anti-entropy reply may be new to the
  mesh around this node: publish those.
- Anti-entropy (periodically, with one random peer over an RPC stream):
  exchange `encode_bucket_summary(ledger.bucket_summary())`, compute
  `differing_buckets`, exchange `encode_digest(ledger.digest(buckets))`, answer
  with `encode_entry_batches(ledger.missing_for(remote_digest))`.
- Housekeeping: `ledger.prune()` now and then; `ledger.counters` for metrics.
"""

from knexa.crdt.codec import (
    CodecError,
    decode_bucket_summary,
    decode_digest,
    decode_entries,
    encode_bucket_summary,
    encode_digest,
    encode_entries,
    encode_entry_batches,
)
from knexa.crdt.digest import BucketSummary, Digest, differing_buckets
from knexa.crdt.entry import Entry
from knexa.crdt.hlc import HybridClock, Timestamp
from knexa.crdt.ledger import Ledger, LedgerCounters, MergeResult
from knexa.crdt.lww_map import LWWMap
from knexa.crdt.namespace import owner_of
from knexa.crdt.orset import ORSet
from knexa.crdt.profile import (
    CapabilityProfile,
    Device,
    Load,
    LoraAdapter,
    ModelInfo,
    ProfileError,
    Reachability,
    Throughput,
)
from knexa.crdt.reputation import Report, Reputation, aggregate_reputation
from knexa.crdt.store import LedgerStore
from knexa.crdt.validation import Limits, RejectReason

__all__ = [
    "BucketSummary",
    "CapabilityProfile",
    "CodecError",
    "Device",
    "Digest",
    "Entry",
    "HybridClock",
    "LWWMap",
    "Ledger",
    "LedgerCounters",
    "LedgerStore",
    "Limits",
    "Load",
    "LoraAdapter",
    "MergeResult",
    "ModelInfo",
    "ORSet",
    "ProfileError",
    "Reachability",
    "RejectReason",
    "Report",
    "Reputation",
    "Throughput",
    "Timestamp",
    "aggregate_reputation",
    "decode_bucket_summary",
    "decode_digest",
    "decode_entries",
    "differing_buckets",
    "encode_bucket_summary",
    "encode_digest",
    "encode_entries",
    "encode_entry_batches",
    "owner_of",
]
