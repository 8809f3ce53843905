"""A local mesh of real daemons on loopback: what `knexa-node testnet` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from knexa.cli.render import print_peers
from knexa.node.paths import STATE_FILE, TOKEN_FILE

# A daemon's first start on a cold machine imports torch and transformers from disk: a run here right after a
# long test run took over 30 s. A node that exits is reported at once whatever this is.
START_TIMEOUT_S = 120.0
MESH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
ENGINE_TIMEOUT_S = 600.0
MAX_BOOTSTRAP_LINKS = 3


class TestnetError(Exception):
    __test__ = False  # not a pytest test class


@dataclass
class LocalNode:
    index: int
    data_dir: Path
    process: subprocess.Popen
    api: str = ""
    token: str = ""
    addr: str = ""

    def get(self, path: str) -> dict:
        response = httpx.get(self.api + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=5)
        response.raise_for_status()
        return response.json()


def start_daemon(
    data_dir: Path, bootstrap: list[str], log_path: Path, extra: list[str] | None = None, model: str = "none"
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "knexa.cli.main", "start",
        "--data-dir", str(data_dir),
        "--listen", "/ip4/127.0.0.1/tcp/0",
        "--api-port", "0",
        "--ping-interval", "1",
        "--model", model,
    ]
    for addr in bootstrap:
        command += ["--bootstrap", addr]
    command += extra or []
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_started(node: LocalNode, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    state_path = node.data_dir / STATE_FILE
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise TestnetError(
                f"node {node.index} exited with code {node.process.returncode}; "
                f"see {node.data_dir / 'daemon.log'}"
            )
        try:
            state = json.loads(state_path.read_text())
            node.api, node.addr = state["api"], state["listen_addrs"][0]
            node.token = (node.data_dir / TOKEN_FILE).read_text().strip()
            return
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.1)
    raise TestnetError(f"node {node.index} did not start within {timeout_s:.0f}s")


def stop_daemon(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> float:
    """SIGTERM, then the seconds it took to exit; SIGKILL if it overruns."""
    started = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return time.monotonic() - started


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, systemd, docker stop) stops the mesh as Ctrl-C does. The daemons run in sessions of their
    own, so SIGTERM's default action, exiting at once, would leave them running with nobody to stop them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_testnet(count: int, *, keep: bool, base_dir: Path | None, console: Console, model: str = "none") -> None:
    with terminate_as_interrupt():
        _run_testnet(count, keep=keep, base_dir=base_dir, console=console, model=model)


def _run_testnet(count: int, *, keep: bool, base_dir: Path | None, console: Console, model: str) -> None:
    if model == "embedded":
        prepare_embedded_model(console)
    with ExitStack() as stack:
        if base_dir is None:
            base_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="knexa-testnet-")))
        nodes: list[LocalNode] = []
        stack.callback(lambda: [stop_daemon(n.process) for n in nodes])
        started = time.monotonic()
        for index in range(count):
            data_dir = base_dir / f"node-{index}"
            data_dir.mkdir(parents=True, exist_ok=True)
            # Each node dials a few earlier ones, so the mesh is connected without
            # every node depending on node 0.
            bootstrap = [n.addr for n in nodes[-MAX_BOOTSTRAP_LINKS:]]
            process = start_daemon(data_dir, bootstrap, data_dir / "daemon.log", model=model)
            node = LocalNode(index, data_dir, process)
            nodes.append(node)
            wait_until_started(node)
            console.print(f"started node {index}: {node.addr}", highlight=False)
        wait_for_mesh(nodes, expected=min(count - 1, MAX_BOOTSTRAP_LINKS))
        console.print(
            f"\nmesh of {count} nodes formed in {time.monotonic() - started:.1f}s\n", highlight=False
        )
        if model != "none":
            wait_for_engines(nodes, console)
            ask_across_the_mesh(nodes[0], nodes[1], console)
        time.sleep(1.2)  # one ping round, so the tables show RTTs
        for node in nodes:
            console.print(f"$ knexa-node peers --data-dir {node.data_dir}", highlight=False, style="dim")
            print_peers(console, node.get("/v1/node"), node.get("/v1/peers")["peers"])
            console.print()
        if keep:
            with suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: the way out of --keep
                console.print("mesh running; Ctrl-C stops it", highlight=False)
                while True:
                    time.sleep(3600)
        took = [stop_daemon(n.process) for n in nodes]
        console.print(f"stopped {count} nodes (slowest shutdown {max(took):.2f}s)", highlight=False)


def prepare_embedded_model(console: Console) -> None:
    """Convert the shipped model once, before the nodes (which share the cache) start."""
    from knexa.node.config import default_data_dir
    from knexa.node.engine import ensure_embedded_model

    with console.status("preparing the embedded SmolLM2 model (first run only: about a minute)"):
        ensure_embedded_model(default_data_dir() / "models", show_progress=False)


def wait_for_engines(nodes: list[LocalNode], console: Console, timeout_s: float = ENGINE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with console.status("loading the model on every node"):
        while time.monotonic() < deadline:
            states = [node.get("/v1/engine")["state"] for node in nodes]
            if "down" in states:
                raise TestnetError(f"an engine failed to load: {states}; see the nodes' daemon.log")
            if all(state == "ready" for state in states):
                return
            time.sleep(0.5)
    raise TestnetError(f"the engines were not ready within {timeout_s:.0f}s")


def ask_across_the_mesh(origin: LocalNode, server: LocalNode, console: Console) -> None:
    """Node `origin` asks `server`'s model over signed RPC; show the answer."""
    server_id = server.get("/v1/node")["peer_id"]
    question = "What is the capital of France?"
    response = httpx.post(
        origin.api + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {origin.token}"},
        json={"messages": [{"role": "user", "content": question}], "max_tokens": 32, "peer": server_id},
        timeout=300,
    )
    response.raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"].strip()
    console.print(f"$ knexa-node ask --peer {server_id[:12]}… {question!r}", style="dim", highlight=False)
    console.print(f"{answer}\n(answered by node {server.index}'s model over signed RPC)\n", highlight=False)


def wait_for_mesh(nodes: list[LocalNode], expected: int, timeout_s: float = MESH_TIMEOUT_S) -> None:
    """Until every node has at least `expected` peers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = []
        for node in nodes:
            try:
                counts.append(len(node.get("/v1/peers")["peers"]))
            except httpx.HTTPError:
                counts.append(-1)
        if min(counts) >= expected:
            return
        time.sleep(0.2)
    raise TestnetError(f"the mesh did not form within {timeout_s:.0f}s (peer counts: {counts})")


if os.name != "posix":  # pragma: no cover
    raise ImportError("the local testnet needs a POSIX system")
