"""Shared fixtures for the ledger tests: reusable keys, a settable clock, entry builders.

Run as a script (`python crdt_helpers.py write-until-killed DIR`) it is the
writer process of the SIGKILL persistence test.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from knexa.crdt.entry import Entry, signing_bytes
from knexa.crdt.ledger import Ledger
from knexa.crdt.profile import (
    CapabilityProfile,
    Device,
    Load,
    LoraAdapter,
    ModelInfo,
    Reachability,
    Throughput,
)
from knexa.crdt.store import LedgerStore
from knexa.crdt.validation import Limits

# Key generation is the slow part of these tests: make a few once and reuse them.
KEY_PAIRS: list[KeyPair] = [create_new_key_pair() for _ in range(8)]
T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_ledger(
    index: int,
    clock: FakeClock,
    store: LedgerStore | None = None,
    limits: Limits | None = None,
) -> Ledger:
    return Ledger(KEY_PAIRS[index], store=store, clock=clock, limits=limits)


def sample_profile(queue_length: int = 0, tokens_per_s: float = 22.0) -> CapabilityProfile:
    return CapabilityProfile(
        device=Device("cuda", "NVIDIA H100", 128 << 30, 80 << 30),
        throughput=Throughput(tokens_per_s, 0.35),
        models=(
            ModelInfo("SmolLM2-135M-Instruct", "llama", 134_515_008, "tok:ab12", "w:cd34", "bf16"),
        ),
        adapters=(LoraAdapter("code-v3", "SmolLM2-135M-Instruct", 8, 3, ("code", "python")),),
        load=Load(queue_length, 1.5),
        reachability=Reachability("private", ("/ip4/100.64.0.1/tcp/4001/p2p/Qm/p2p-circuit",)),
        skills=(("code", 0.7), ("math", 0.4)),
    )


def unsigned_entry(
    key: str,
    author: str,
    wall_ms: int,
    counter: int = 0,
    payload: bytes = b"\xc0",
    expires_at_ms: int = 0,
    deleted: bool = False,
) -> Entry:
    """An entry for the pure CRDT tests, which never check signatures."""
    return Entry(key, payload, wall_ms, counter, author, expires_at_ms, deleted, b"\0" * 64)


def resign(entry: Entry, key_pair: KeyPair, **changes: object) -> Entry:
    """`entry` with fields changed and a valid signature by `key_pair` over the result."""
    changed = dataclasses.replace(entry, **changes)
    message = signing_bytes(
        changed.key,
        changed.payload,
        changed.wall_ms,
        changed.counter,
        changed.author,
        changed.expires_at_ms,
        changed.deleted,
    )
    return dataclasses.replace(changed, signature=key_pair.private_key.sign(message))


def state_of(ledger: Ledger) -> dict[str, Entry]:
    return {e.key: e for e in ledger.entries()}


def _pause() -> int:
    time.sleep(0.001)
    return 0  # non-zero would abort the statement


def write_until_killed(data_dir: Path) -> None:
    """Merge batches of signed reports forever, printing each batch's keys after commit."""
    author = Ledger(KEY_PAIRS[1])
    store = LedgerStore.in_data_dir(data_dir)
    # Slow SQLite down from inside: the process then spends most of its time in
    # the middle of a transaction, which is where the kill should land.
    store._db.set_progress_handler(_pause, 100)
    ledger = Ledger(KEY_PAIRS[0], store=store)
    padding = "x" * 200
    batch_number = 0
    while True:
        batch = [
            author.put_report(f"subject{batch_number}-{i}", 0.5, padding) for i in range(50)
        ]
        result = ledger.merge(batch)
        assert len(result.accepted) == len(batch)
        print(" ".join(e.key.rsplit("/", 1)[1] for e in batch), flush=True)
        batch_number += 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["write-until-killed"]:
        write_until_killed(Path(sys.argv[2]))
