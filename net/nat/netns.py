"""A NAT testbed on one Linux machine: network namespaces, veth pairs, iptables routers.

Topology (every address lives inside namespaces this module creates and removes):

    <p>-pub   "the internet": 100.64.0.1/32 on lo (the bootstrap/relay node),
              routes to both routers' WAN sides
    <p>-r1    router 1: WAN 100.64.1.2 (peer 100.64.1.1 in pub), LAN 192.168.1.1,
              iptables MASQUERADE out of the WAN side
    <p>-h1    home node 1: 192.168.1.2, default route via the router
    <p>-r2 / <p>-h2   the same with 100.64.2.x and 192.168.2.x

A router built with `random_fully` masquerades with `--random-fully`, a
port-randomizing NAT. Routers drop unsolicited inbound packets, as home routers do.
Needs root, `ip` (iproute2) and `iptables`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
PUBLIC_IP = "100.64.0.1"


class TestbedError(RuntimeError):
    """The testbed cannot be built here; the message says why."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the testbed, or None if it can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the NAT testbed needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 iptables)"
    probe = f"kxprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except TestbedError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        # The very rules the routers use: listing alone can work where adding them does not.
        for rule in _nat_rules(random_fully=True):
            _run(["ip", "netns", "exec", probe, *rule])
        _run(["ip", "netns", "exec", probe, *_FORWARD_ON])
    except TestbedError as exc:
        return f"iptables NAT does not work in a namespace here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


# Without sysctl(8), which minimal systems lack.
_FORWARD_ON = ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]


def _nat_rules(random_fully: bool) -> list[list[str]]:
    masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
    if random_fully:
        masquerade.append("--random-fully")
    # Like a home router's firewall: unsolicited packets from the WAN are dropped silently.
    # Without it the router's own stack answers a SYN for an unmapped port with a RST, which
    # kills the peer's half of a TCP simultaneous open before the mapping exists.
    drop = ["iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"]
    return [masquerade, drop]


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip() or proc.returncode}")
    return proc.stdout


@dataclass
class Home:
    """One home segment: a router namespace and a host namespace behind it."""

    index: int
    router_ns: str
    host_ns: str
    random_fully: bool

    @property
    def wan_ip(self) -> str:
        return f"100.64.{self.index}.2"

    @property
    def host_ip(self) -> str:
        return f"192.168.{self.index}.2"


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"kx{os.getpid() % 100000}")
    random_fully: frozenset[int] = frozenset()
    homes: list[Home] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    @property
    def public_ns(self) -> str:
        return f"{self.prefix}-pub"

    def namespaces(self) -> list[str]:
        return [self.public_ns] + [ns for h in self.homes for ns in (h.router_ns, h.host_ns)]

    def ns_exec(self, ns: str, *cmd: str) -> str:
        return _run(["ip", "netns", "exec", ns, *cmd])

    def setup(self) -> Topology:
        """Build the namespaces; on any failure remove what was built and raise TestbedError."""
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        self.ns_exec(ns, "ip", "link", "set", "lo", "up")

    def _setup(self) -> None:
        pub = self.public_ns
        self._add_ns(pub)
        self.ns_exec(pub, "ip", "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo")
        self.ns_exec(pub, *_FORWARD_ON)
        for index in (1, 2):
            home = Home(index, f"{self.prefix}-r{index}", f"{self.prefix}-h{index}", index in self.random_fully)
            self.homes.append(home)
            self._add_ns(home.router_ns)
            self._add_ns(home.host_ns)
            # WAN link: pub <-> router (created directly inside the namespaces: no names in the root ns)
            _run(["ip", "link", "add", "wan", "netns", home.router_ns, "type", "veth",
                  "peer", "name", f"home{index}", "netns", pub])
            self.ns_exec(pub, "ip", "addr", "add", f"100.64.{index}.1/24", "dev", f"home{index}")
            self.ns_exec(pub, "ip", "link", "set", f"home{index}", "up")
            self.ns_exec(home.router_ns, "ip", "addr", "add", f"{home.wan_ip}/24", "dev", "wan")
            self.ns_exec(home.router_ns, "ip", "link", "set", "wan", "up")
            self.ns_exec(home.router_ns, "ip", "route", "add", "default", "via", f"100.64.{index}.1")
            # LAN link: router <-> host
            _run(["ip", "link", "add", "lan", "netns", home.router_ns, "type", "veth",
                  "peer", "name", "eth0", "netns", home.host_ns])
            self.ns_exec(home.router_ns, "ip", "addr", "add", f"192.168.{index}.1/24", "dev", "lan")
            self.ns_exec(home.router_ns, "ip", "link", "set", "lan", "up")
            self.ns_exec(home.host_ns, "ip", "addr", "add", f"{home.host_ip}/24", "dev", "eth0")
            self.ns_exec(home.host_ns, "ip", "link", "set", "eth0", "up")
            self.ns_exec(home.host_ns, "ip", "route", "add", "default", "via", f"192.168.{index}.1")
            self.ns_exec(home.router_ns, *_FORWARD_ON)
            for rule in _nat_rules(home.random_fully):
                self.ns_exec(home.router_ns, *rule)

    def teardown(self) -> None:
        """Remove every namespace this topology created (their veths and NAT rules go with them)."""
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created.clear()

    def __enter__(self) -> Topology:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def in_namespace(ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that has joined namespace `ns`: its sockets live there.

    setns(CLONE_NEWNET) changes only the calling thread, so a throwaway thread
    lets this process talk to a daemon's loopback-only API inside the namespace.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errors.append(OSError(ctypes.get_errno(), f"setns {ns} failed"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
