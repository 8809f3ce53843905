"""NAT testbed scenarios: real knexa-node daemons in network namespaces behind iptables NATs.

    python -m knexa.net.nat.testbed [a|b|c|all] [--keep-logs]     (root; see deploy/netns-testnet)

(a) both homes behind port-preserving MASQUERADE: the nodes meet through the relay,
    then DCUtR upgrades them to a direct connection.
(b) home 2 behind `--random-fully` (port-randomizing): the relayed connection carries
    signed RPC traffic; hole punching is expected to fail.
(c) as (a), then the relay is killed: the nodes keep their direct connection.

Each scenario prints what happened with timings and returns a result dict; the
namespaces and daemons are removed on exit, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knexa.net.nat.netns import PUBLIC_IP, Topology, in_namespace, unavailable_reason

PORT = 4001
API_PORT = 7700


class ScenarioFailed(AssertionError):
    """A scenario did not reach the state it expects; the message says which and the logs where."""


@dataclass
class Node:
    name: str
    ns: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    peer_id: str = ""
    token: str = ""

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        url = f"http://127.0.0.1:{API_PORT}{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})

        def call() -> Any:
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                raise ScenarioFailed(f"{self.name}: {method} {path} -> {exc.code} {exc.read()[:300]!r}") from None

        return in_namespace(self.ns, call)

    def cli(self, *args: str) -> str:
        """A knexa-node command run inside the node's namespace, against its API."""
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-c", "from knexa.cli.main import main; main()",
               *args, "--data-dir", str(self.data_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        return proc.stdout + proc.stderr

    def info(self) -> dict[str, Any]:
        return self.api("GET", "/v1/node")

    def peer(self, peer_id: str) -> dict[str, Any] | None:
        for p in self.api("GET", "/v1/peers")["peers"]:
            if p["peer_id"] == peer_id:
                return p
        return None


@dataclass
class Testbed:
    random_fully: frozenset[int] = frozenset()
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="knexa-netns-")))
    keep_logs: bool = False
    topology: Topology | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    out: Callable[[str], None] = print

    def __enter__(self) -> Testbed:
        self.topology = Topology(random_fully=self.random_fully).setup()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            if self.topology is not None:
                self.topology.teardown()
            if not self.keep_logs and exc[0] is None:
                shutil.rmtree(self.base, ignore_errors=True)
            elif exc[0] is not None:
                self.out(f"logs kept in {self.base}")

    def start(self, name: str, ns: str, listen: str, *extra: str) -> Node:
        data_dir = self.base / name
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", "from knexa.cli.main import main; main()",
               "start", "--data-dir", str(data_dir), "--listen", listen, "--api-port", str(API_PORT),
               "--model", "none", "--ping-interval", "1",
               "--log-level", os.environ.get("KNEXA_TESTBED_LOG_LEVEL", "info"), *extra]
        log = (data_dir / "daemon.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, ns, data_dir, proc)
        self.nodes[name] = node
        deadline = time.monotonic() + 60
        state = data_dir / "daemon.json"
        while not state.exists():
            if proc.poll() is not None:
                raise ScenarioFailed(f"{name} exited with {proc.returncode}; see {data_dir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"{name} did not start within 60 s; see {data_dir / 'daemon.log'}")
            time.sleep(0.1)
        node.peer_id = json.loads(state.read_text())["peer_id"]
        node.token = (data_dir / "api.token").read_text().strip()
        return node

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        node = self.nodes.pop(name, None)
        if node is None or node.proc.poll() is not None:
            return
        node.proc.send_signal(sig)
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.nodes):
            self.stop(name)

    def start_network(self) -> tuple[Node, Node, Node]:
        assert self.topology is not None
        relay = self.start("relay", self.topology.public_ns, f"/ip4/{PUBLIC_IP}/tcp/{PORT}", "--relay-service", "on")
        boot = f"/ip4/{PUBLIC_IP}/tcp/{PORT}/p2p/{relay.peer_id}"
        h1 = self.start("home1", self.topology.homes[0].host_ns, f"/ip4/0.0.0.0/tcp/{PORT}", "--bootstrap", boot)
        h2 = self.start("home2", self.topology.homes[1].host_ns, f"/ip4/0.0.0.0/tcp/{PORT}", "--bootstrap", boot)
        return relay, h1, h2


def wait_until(what: str, check: Callable[[], Any], timeout_s: float, step_s: float = 0.1) -> tuple[Any, float]:
    """Poll `check` until it returns something truthy; returns (value, seconds waited)."""
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise ScenarioFailed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(step_s)


def _private_with_relay(node: Node) -> dict[str, Any] | None:
    nat = node.info().get("nat") or {}
    return nat if nat.get("reachability") == "private" and nat.get("relay_addrs") else None


def _try_echo(node: Node, peer: str) -> dict[str, Any] | None:
    try:
        return _echo(node, peer, 1024, 1)
    except ScenarioFailed:
        return None


def _meet(bed: Testbed, explicit: bool = True) -> dict[str, Any]:
    """Start the three nodes, wait for reachability and reservations, then home1 reaches home2 through
    the relay: with `knexa-node connect <circuit addr>` (explicit), or by just calling it over RPC, which
    finds the relay address in home2's ledger profile."""
    out = bed.out
    t0 = time.monotonic()
    relay, h1, h2 = bed.start_network()
    out(f"started relay {relay.peer_id[-8:]}, home1 {h1.peer_id[-8:]}, home2 {h2.peer_id[-8:]} "
        f"in {time.monotonic() - t0:.1f}s")
    relay_nat, t_public = wait_until("relay finds itself public", lambda: (
        relay.info()["nat"]["reachability"] == "public" and relay.info()["nat"]), 60)
    out(f"relay: AutoNAT says public after {t_public:.1f}s (votes {relay_nat['autonat_votes']})")
    nat1, t1 = wait_until("home1 private with a reservation", lambda: _private_with_relay(h1), 90)
    nat2, t2 = wait_until("home2 private with a reservation", lambda: _private_with_relay(h2), 90)
    out(f"home1: private, reserved on the relay, advertises {nat1['relay_addrs'][0]} ({t1:.1f}s)")
    out(f"home2: private, reserved on the relay, advertises {nat2['relay_addrs'][0]} (+{t2:.1f}s)")
    started = time.monotonic()
    if explicit:
        reply = h1.api("POST", "/v1/connect", {"addr": nat2["relay_addrs"][0]})
        seconds = reply["seconds"]
        out(f"home1 -> home2 through the relay: connected in {seconds * 1000:.0f} ms")
    else:
        # home2's profile (with its relay address) reaches home1 through the relay's gossip.
        _, seconds = wait_until("home1 reaches home2 by RPC alone", lambda: _try_echo(h1, h2.peer_id), 60, 0.5)
        out(f"home1 -> home2 by RPC to its peer id: the relay address came from home2's ledger profile "
            f"({seconds:.1f}s after both reserved)")
    return {"relay": relay, "h1": h1, "h2": h2, "contact_at": started, "relay_connect_s": seconds,
            "reservation_s": max(t1, t2)}


def _echo(node: Node, peer: str, size: int, count: int) -> dict[str, Any]:
    result = node.api("POST", "/v1/diag/echo", {"peer": peer, "size": size, "count": count}, timeout=300)
    if result["mismatches"]:
        raise ScenarioFailed(f"{result['mismatches']} echo replies differed from their requests")
    return result


def _bench(bed: Testbed, h1: Node, h2: Node, label: str) -> dict[str, Any]:
    small = _echo(h1, h2.peer_id, 1024, 200)
    bulk = _echo(h1, h2.peer_id, 256 * 1024, 64)
    bed.out(f"RPC over the {label} path ({', '.join(bulk['rpc_paths'])}): 1 KiB p50 {small['p50_ms']:.2f} ms "
            f"p99 {small['p99_ms']:.2f} ms; 256 KiB x 64: {bulk['mib_per_s']:.1f} MiB/s each way, "
            "every reply verified")
    return {"small": small, "bulk": bulk}


def scenario_a(bed: Testbed, kill_relay: bool = False) -> dict[str, Any]:
    met = _meet(bed)
    h1, h2 = met["h1"], met["h2"]
    kind, t_direct = wait_until("home1 sees home2 hole-punched", lambda: (
        (h1.peer(h2.peer_id) or {}).get("kind") == "hole-punched" and h1.peer(h2.peer_id)), 120)
    since_contact = time.monotonic() - met["contact_at"]
    punches = h1.info()["nat"]["hole_punches"] + h2.info()["nat"]["hole_punches"]
    ok = [p for p in punches if p["ok"]]
    bed.out(f"hole punch: direct connection {kind['address']} {since_contact:.2f}s after first contact"
            + (f" (DCUtR exchange {ok[0]['seconds']:.2f}s, {len(punches)} attempt(s))" if ok else ""))
    other, _ = wait_until("home2 sees home1 hole-punched", lambda: (
        (h2.peer(h1.peer_id) or {}).get("kind") == "hole-punched" and h2.peer(h1.peer_id)), 30)
    result: dict[str, Any] = {"scenario": "a", "first_contact_to_direct_s": round(since_contact, 3),
                              "relay_connect_s": met["relay_connect_s"], "punch_attempts": len(punches),
                              "direct_addr_h1": kind["address"], "direct_addr_h2": other["address"]}
    peers_output = h1.cli("peers")
    bed.out("$ knexa-node peers   (home1)\n" + peers_output.rstrip())
    result["peers_output"] = peers_output
    result["rpc_direct"] = _bench(bed, h1, h2, "direct")
    if kill_relay:
        result.update(_kill_relay(bed, h1, h2))
    return result


def _kill_relay(bed: Testbed, h1: Node, h2: Node) -> dict[str, Any]:
    killed_at = time.monotonic()
    bed.stop("relay", signal.SIGKILL)
    bed.out("relay killed (SIGKILL)")
    time.sleep(5)  # longer than the nodes' ping interval: a dead path would show
    p1, p2 = h1.peer(h2.peer_id), h2.peer(h1.peer_id)
    if not p1 or not p2:
        raise ScenarioFailed("the nodes lost each other when the relay died")
    echo = _echo(h1, h2.peer_id, 1024, 50)
    bed.out(f"after the relay died: still connected ({p1['kind']}, {p1['address']}), "
            f"RPC p50 {echo['p50_ms']:.2f} ms over {', '.join(echo['rpc_paths'])}, "
            f"{time.monotonic() - killed_at:.1f}s after the kill")
    return {"after_relay_death": {"kind": p1["kind"], "address": p1["address"], "echo": echo}}


def scenario_b(bed: Testbed) -> dict[str, Any]:
    met = _meet(bed, explicit=False)
    h1, h2 = met["h1"], met["h2"]
    peer = h1.peer(h2.peer_id)
    if not peer or peer["kind"] != "relayed":
        raise ScenarioFailed(f"expected a relayed connection, got {peer}")
    bench = _bench(bed, h1, h2, "relayed")
    # Give DCUtR its first attempts; through a port-randomizing NAT they should fail.
    _, waited = wait_until("a hole-punch attempt", lambda: (
        h1.info()["nat"]["hole_punches"] + h2.info()["nat"]["hole_punches"]), 60)
    punches = h1.info()["nat"]["hole_punches"] + h2.info()["nat"]["hole_punches"]
    now_kind = (h1.peer(h2.peer_id) or {}).get("kind")
    retry = next((p["retry_in_s"] for p in punches if p.get("retry_in_s") is not None), None)
    bed.out(f"hole punch through the port-randomizing NAT: {len(punches)} attempt(s), "
            f"{sum(p['ok'] for p in punches)} succeeded ({punches[0]['seconds']:.1f}s, {punches[0]['reason']}); "
            f"connection now {now_kind}" + (f"; next attempt in {retry:.0f}s" if retry is not None else ""))
    if now_kind not in ("relayed", "hole-punched"):
        raise ScenarioFailed(f"the nodes lost each other (kind {now_kind})")
    after = _echo(h1, h2.peer_id, 1024, 20)
    bed.out(f"RPC still answered after the punch attempts: p50 {after['p50_ms']:.2f} ms over "
            f"{', '.join(after['rpc_paths'])}")
    return {"scenario": "b", "rpc_relayed": bench, "punch_attempts": len(punches),
            "punch_succeeded": sum(p["ok"] for p in punches), "kind_after": now_kind}


def run(name: str, keep_logs: bool = False, out: Callable[[str], None] = print) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    random_fully = frozenset({2}) if name == "b" else frozenset()
    out(f"== scenario {name}: " + {
        "a": "two homes behind port-preserving NATs: relay, then hole punch",
        "b": "home 2 behind a port-randomizing NAT (--random-fully): RPC over the relay",
        "c": "hole-punched pair, then the relay dies",
    }[name])
    started = time.monotonic()
    with Testbed(random_fully=random_fully, keep_logs=keep_logs, out=out) as bed:
        if name == "b":
            result = scenario_b(bed)
        else:
            result = scenario_a(bed, kill_relay=name == "c")
            result["scenario"] = name
        result["logs"] = str(bed.base)
    result["total_s"] = round(time.monotonic() - started, 1)
    out(f"== scenario {name} passed in {result['total_s']:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns-testnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default="all", choices=["a", "b", "c", "all"])
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' data dirs and logs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the testbed's teardown

    signal.signal(signal.SIGTERM, interrupted)
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    results = []
    failed = False
    for name in (["a", "b", "c"] if args.scenario == "all" else [args.scenario]):
        try:
            results.append(run(name, keep_logs=args.keep_logs))
        except ScenarioFailed as exc:
            print(f"== scenario {name} FAILED: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
