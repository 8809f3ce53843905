"""The NAT testbed scenarios as tests: real daemons in network namespaces behind iptables NATs.

Needs root, iproute2 and iptables (CI installs them); skipped with the reason otherwise.
Timings are printed (run with -s), never asserted."""

from __future__ import annotations

import subprocess

import pytest

from knexa.net.nat.netns import Topology, unavailable_reason
from knexa.net.nat.testbed import run

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"NAT testbed unavailable: {REASON}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hole_punch_through_port_preserving_nats_survives_relay_death() -> None:
    """Scenarios (a) and (c): meet through the relay, hole-punch, then lose the relay."""
    before = _namespaces()
    result = run("c", out=print)
    assert result["direct_addr_h1"] == "/ip4/100.64.2.2/tcp/4001"  # home2's router, its listen port kept
    assert result["direct_addr_h2"] == "/ip4/100.64.1.2/tcp/4001"
    assert result["rpc_direct"]["bulk"]["mismatches"] == 0
    # After the punch, new RPC streams run over the direct connection, not the relay.
    assert result["rpc_direct"]["bulk"]["rpc_paths"] == ["/ip4/100.64.2.2/tcp/4001"]
    after = result["after_relay_death"]
    assert after["kind"] == "hole-punched"
    assert all("/p2p-circuit" not in p for p in after["echo"]["rpc_paths"])
    assert _namespaces() == before  # torn down


def test_relay_carries_rpc_through_a_port_randomizing_nat() -> None:
    """Scenario (b): --random-fully on one router; the relayed connection carries signed RPC."""
    before = _namespaces()
    result = run("b", out=print)
    bench = result["rpc_relayed"]
    assert bench["small"]["mismatches"] == 0 and bench["bulk"]["mismatches"] == 0
    assert all("/p2p-circuit" in p for p in bench["bulk"]["rpc_paths"])
    assert result["kind_after"] in ("relayed", "hole-punched")
    assert _namespaces() == before


def test_topology_is_removed_even_when_setup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    topology = Topology(prefix="kxfail")
    calls = {"n": 0}
    real = topology.ns_exec

    def failing(ns: str, *cmd: str) -> str:
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("injected failure")
        return real(ns, *cmd)

    monkeypatch.setattr(topology, "ns_exec", failing)
    with pytest.raises(RuntimeError):
        topology.setup()
    assert not any(ns.startswith("kxfail-") for ns in _namespaces())
