"""The ledger's write and wait routes on real daemons: an operator's report spreads,
and a wait on another node returns when it lands there."""

from __future__ import annotations

import time

import httpx
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID

from knexa.node.daemon import Daemon
from tests.conftest import p2p_addr, running_daemon, wait_for


def _client(daemon: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=daemon.api_url, timeout=10, headers={"Authorization": f"Bearer {daemon.api_token}"}
    )


async def test_a_report_spreads_and_a_wait_sees_it_arrive(tmp_path):
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
        await wait_for(lambda: set(b.ledger.profiles()) == {a.peer_id, b.peer_id}, 20)
        subject = str(PeerID.from_pubkey(create_new_key_pair().public_key))
        key = f"report/{a.peer_id}/{subject}"
        seen: dict[str, object] = {}
        async with _client(a) as ca, _client(b) as cb, trio.open_nursery() as nursery:

            async def wait_on_b() -> None:
                seen.update((await cb.get("/v1/ledger/wait", params={"key": key, "timeout_s": 20})).json())

            nursery.start_soon(wait_on_b)
            await trio.sleep(0.2)
            before_ms = time.time() * 1000
            written = await ca.post("/v1/ledger/reports", json={"subject": subject, "score": 0.1, "reason": "op"})
            assert written.status_code == 200, written.text
            entry = written.json()
            assert entry["key"] == key and entry["author"] == a.peer_id and entry["value"]["score"] == 0.1
        assert seen["present"] is True and seen["seen_at_ms"] >= before_ms - 1
        assert b.ledger.reputation(subject).report_count == 1

        async with _client(b) as cb:
            absent = (await cb.get("/v1/ledger/wait", params={"key": "report/x/y", "timeout_s": 0.2})).json()
            assert absent == {"key": "report/x/y", "present": False, "seen_at_ms": None}
            assert (await cb.get("/v1/ledger/wait", params={"key": key, "timeout_s": 0})).status_code == 400
            assert (await cb.get("/v1/ledger/wait", params={"key": key, "timeout_s": 3600})).status_code == 400
            bad = [
                ({"subject": "not-a-peer", "score": 0.5}, 400),
                ({"subject": b.peer_id, "score": 0.5}, 400),  # about itself
                ({"subject": subject, "score": 1.5}, 422),
                ({"subject": subject, "score": 0.5, "reason": "x" * 10_000}, 422),
            ]
            for body, status in bad:
                assert (await cb.post("/v1/ledger/reports", json=body)).status_code == status, body
            unauthorized = await httpx.AsyncClient(base_url=b.api_url).post(
                "/v1/ledger/reports", json={"subject": subject, "score": 0.5}
            )
            assert unauthorized.status_code == 401
        assert b.ledger.reports_about(subject).keys() == {a.peer_id}
