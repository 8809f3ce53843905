"""Fixtures shared by the daemon tests: real daemons in this process, on loopback."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import settings

from knexa.node.config import NodeConfig
from knexa.node.daemon import Daemon

# Property tests check what the code does, not how fast: hypothesis's default 200 ms per example failed a CI-like
# run once when one example took 0.9 s on a loaded machine (and 0.5 ms on the rerun).
settings.register_profile("knexa", deadline=None)
settings.load_profile("knexa")

def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a test that stops a node and starts it again
    on its port must not find it taken meanwhile by a socket bound to port 0 (a run caught another node's API
    on it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def node_config(
    data_dir: Path,
    bootstrap: list[str] | None = None,
    port: int = 0,
    model: str = "none",
    cache_dir: Path | None = None,
    **settings: object,
) -> NodeConfig:
    """A test node's configuration: loopback only, an ephemeral API port, quick pings."""
    return NodeConfig(
        data_dir=data_dir,
        listen=[f"/ip4/127.0.0.1/tcp/{port}"],
        bootstrap=bootstrap or [],
        api_port=0,
        ping_interval_s=0.5,
        model=model,
        cache_dir=cache_dir or data_dir / "cache",
        **settings,
    ).validate()


@asynccontextmanager
async def running_daemon(
    data_dir: Path,
    bootstrap: list[str] | None = None,
    port: int = 0,
    model: str = "none",
    cache_dir: Path | None = None,
    **settings: object,
) -> AsyncIterator[Daemon]:
    daemon = Daemon(node_config(data_dir, bootstrap, port, model, cache_dir, **settings))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


def p2p_addr(daemon: Daemon) -> str:
    return str(daemon.host.get_addrs()[0])


async def api_get(daemon: Daemon, path: str, token: str | None = "default") -> httpx.Response:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {daemon.api_token if token == 'default' else token}"
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as client:
        return await client.get(path, headers=headers)


async def peer_ids_seen(daemon: Daemon) -> set[str]:
    response = await api_get(daemon, "/v1/peers")
    response.raise_for_status()
    return {p["peer_id"] for p in response.json()["peers"]}


async def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, step_s: float = 0.05) -> None:
    """Poll an async or sync predicate until it is true; fail the test at the deadline."""
    with trio.move_on_after(timeout_s):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(step_s)
    pytest.fail(f"condition not met within {timeout_s}s")
