"""Accepted entries survive a clean restart and a SIGKILL in the middle of a write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knexa.crdt.ledger import Ledger
from knexa.crdt.store import DB_FILE, LedgerStore

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import KEY_PAIRS, FakeClock, make_ledger, resign, sample_profile, state_of

HELPERS = Path(__file__).parent / "crdt_helpers.py"


def test_store_uses_wal_mode(tmp_path: Path) -> None:
    LedgerStore.in_data_dir(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_ledger_reloads_its_state_after_a_clean_close(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    peer = make_ledger(1, clock)
    ledger.put_profile(sample_profile(queue_length=4))
    ledger.orset_add("groups", "gpu")
    ledger.merge([peer.put_profile(sample_profile()), peer.put_report(ledger.peer_id, 1, "ok")])
    newer = peer.put_profile(sample_profile(queue_length=9))
    ledger.merge([newer])
    before = state_of(ledger)
    ledger.close()

    reopened = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    assert state_of(reopened) == before
    assert reopened.profiles()[peer.peer_id].load.queue_length == 9
    assert reopened.reputation(ledger.peer_id).report_count == 1
    assert reopened.counters.rejected == {}


def test_writes_after_restart_order_after_the_saved_ones(tmp_path: Path) -> None:
    clock = FakeClock()
    first = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    saved = first.put_profile(sample_profile(queue_length=1))
    first.close()
    clock.advance(-30)  # the wall clock went backwards across the restart
    second = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    again = second.put_profile(sample_profile(queue_length=2))
    assert again.version > saved.version
    assert second.profiles()[second.peer_id].load.queue_length == 2


def test_pruned_entries_are_deleted_from_the_store(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    ledger.put_profile(sample_profile(), ttl_s=1)
    clock.advance(10)
    assert ledger.prune(grace_s=1) == 1
    ledger.close()
    assert make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path)).entries() == []


def test_tampered_rows_are_rejected_on_load(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = make_ledger(0, clock, store=LedgerStore.in_data_dir(tmp_path))
    entry = ledger.put_profile(sample_profile())
    ledger.close()
    store = LedgerStore.in_data_dir(tmp_path)
    store.save([resign(entry, KEY_PAIRS[3])])  # now signed by a key that is not the author's
    reloaded = Ledger(KEY_PAIRS[0], store=store, clock=clock)
    assert reloaded.entries() == []
    assert reloaded.counters.rejected == {"bad_signature": 1}


@pytest.mark.parametrize("kill_delay_s", [0.0, 0.011, 0.023])
def test_sigkill_mid_write_loses_no_acknowledged_entry(
    tmp_path: Path, kill_delay_s: float
) -> None:
    writer = subprocess.Popen(
        [sys.executable, str(HELPERS), "write-until-killed", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    try:
        assert writer.stdout is not None
        deadline = time.monotonic() + 30
        while len(acknowledged) < 10 * 50 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            acknowledged.extend(line.split())
        # The writer spends most of its time inside a transaction (see
        # crdt_helpers.write_until_killed); vary where in it the kill lands.
        time.sleep(kill_delay_s)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 50, "the writer never acknowledged a batch"

    store = LedgerStore.in_data_dir(tmp_path)
    assert store.integrity_ok()
    ledger = Ledger(KEY_PAIRS[0], store=store)
    assert ledger.counters.rejected == {}
    subjects = {e.key.rsplit("/", 1)[1] for e in ledger.entries()}
    assert set(acknowledged) <= subjects
    # Whole batches only: a transaction is committed entirely or not at all.
    assert len(subjects) % 50 == 0
