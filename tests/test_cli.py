"""The real `knexa-node` CLI as subprocesses: daemons, peers, shutdown, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knexa.node.config import default_data_dir
from knexa.node.testnet import (
    LocalNode,
    start_daemon,
    stop_daemon,
    wait_for_mesh,
    wait_until_started,
)

CLI = [sys.executable, "-m", "knexa.cli.main"]
NO_MODEL_START = ("--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--model", "none")


def cli(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def mesh(tmp_path):
    nodes: list[LocalNode] = []
    try:
        for index in range(3):
            data_dir = tmp_path / f"node-{index}"
            data_dir.mkdir()
            process = start_daemon(data_dir, [n.addr for n in nodes], data_dir / "daemon.log")
            node = LocalNode(index, data_dir, process)
            nodes.append(node)
            wait_until_started(node)
        wait_for_mesh(nodes, expected=2)
        yield nodes
    finally:
        for node in nodes:
            stop_daemon(node.process)


def test_three_daemons_list_each_other_stop_and_keep_identity(mesh):
    ids = {}
    for node in mesh:
        ids[node.index] = json.loads(cli("id", "--json", "--data-dir", str(node.data_dir)).stdout)["peer_id"]
    for node in mesh:
        result = cli("peers", "--json", "--data-dir", str(node.data_dir))
        assert result.returncode == 0, result.stderr
        listed = {peer["peer_id"] for peer in json.loads(result.stdout)}
        assert listed == set(ids.values()) - {ids[node.index]}
        table = cli("peers", "--data-dir", str(node.data_dir))
        assert table.returncode == 0 and "direct" in table.stdout
        status = cli("status", "--data-dir", str(node.data_dir))
        assert status.returncode == 0 and ids[node.index] in status.stdout
    for node in reversed(mesh):
        took = stop_daemon(node.process, timeout_s=10)
        assert node.process.returncode == 0
        assert took < 5.0, f"node {node.index} took {took:.2f}s to stop"
        log = (node.data_dir / "daemon.log").read_text()
        assert "Traceback" not in log
        assert "event=stopped" in log
        if node.index == 2:
            # It said goodbye: its profile is retracted in the others' ledgers, not left to expire.
            assert "event=goodbye entries=1 peers_told=2" in log
            entries = json.loads(cli("ledger", "--json", "--peer", ids[2], "--data-dir", str(mesh[0].data_dir)).stdout)
            profile = next(e for e in entries["entries"] if e["kind"] == "profile")
            assert profile["deleted"] is True
            shown = cli("ledger", "--peer", ids[2], "--data-dir", str(mesh[0].data_dir)).stdout
            assert "deleted" in shown and "(retracted)" in shown
    # Restart keeps the peer id.
    node = mesh[0]
    node.process = start_daemon(node.data_dir, [], node.data_dir / "daemon.log")
    try:
        wait_until_started(node)
        assert node.get("/v1/node")["peer_id"] == ids[0]
    finally:
        stop_daemon(node.process)


def test_sigint_stops_cleanly(tmp_path):
    process = start_daemon(tmp_path, [], tmp_path / "daemon.log")
    node = LocalNode(0, tmp_path, process)
    wait_until_started(node)
    process.send_signal(signal.SIGINT)
    assert process.wait(5) == 0
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_id_before_first_start_creates_a_stable_identity(tmp_path):
    first = json.loads(cli("id", "--json", "--data-dir", str(tmp_path)).stdout)
    second = json.loads(cli("id", "--json", "--data-dir", str(tmp_path)).stdout)
    assert first["peer_id"] == second["peer_id"]
    assert first["running"] is False
    assert oct((tmp_path / "identity.key").stat().st_mode & 0o777) == "0o600"


def test_no_daemon_running(tmp_path):
    result = cli("peers", "--data-dir", str(tmp_path), "--api", "http://127.0.0.1:9")
    assert_one_line_error(result, "not running")
    result = cli("status", "--data-dir", str(tmp_path), "--api", "http://127.0.0.1:9")
    assert_one_line_error(result, "not running")


def test_malformed_multiaddr(tmp_path):
    result = cli("start", "--data-dir", str(tmp_path), "--listen", "/ip4/300.1.1.1/tcp/1")
    assert_one_line_error(result, "invalid multiaddr")
    result = cli("start", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/4001")
    assert_one_line_error(result, "/p2p/")


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("start", "--data-dir", str(tmp_path), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
                     "--api-port", "0", "--model", "none")
        assert_one_line_error(result, "cannot listen", "address already in use")
        result = cli("start", "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/0",
                     "--api-port", str(port), "--model", "none")
        assert_one_line_error(result, "local API", "address already in use")


def test_corrupted_key_file(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"\x00garbage")
    result = cli("start", *NO_MODEL_START, "--data-dir", str(tmp_path))
    assert_one_line_error(result, "corrupted")
    assert_one_line_error(cli("id", "--data-dir", str(tmp_path)), "corrupted")


def test_bad_config_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("listen = [\n")
    assert_one_line_error(cli("start", "--config", str(config)), "not valid TOML")
    config.write_text('api_port = "x"\n')
    assert_one_line_error(cli("start", "--config", str(config)), "api_port")
    config.write_text("colour = 1\n")
    assert_one_line_error(cli("start", "--config", str(config)), "unknown setting")


def test_second_daemon_on_same_data_dir(tmp_path):
    process = start_daemon(tmp_path, [], tmp_path / "daemon.log")
    try:
        wait_until_started(LocalNode(0, tmp_path, process))
        result = cli("start", *NO_MODEL_START, "--data-dir", str(tmp_path))
        assert_one_line_error(result, "already running")
    finally:
        stop_daemon(process)


def test_wrong_api_token(tmp_path):
    process = start_daemon(tmp_path, [], tmp_path / "daemon.log")
    try:
        wait_until_started(LocalNode(0, tmp_path, process))
        result = cli("peers", "--data-dir", str(tmp_path), "--token", "wrong")
        assert_one_line_error(result, "refused the API token")
        assert cli("peers", "--data-dir", str(tmp_path)).returncode == 0
    finally:
        stop_daemon(process)


def test_unreachable_bootstrap_is_retried_with_a_clear_warning(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        unreachable = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWEYqEuyb5RPmVZ5Ry3e4whsM4ho2SFJpAR31EmHGsJLWT"
        log_path = tmp_path / "daemon.log"
        process = start_daemon(tmp_path, [unreachable], log_path)
        try:
            node = LocalNode(0, tmp_path, process)
            wait_until_started(node)
            deadline = time.monotonic() + 15
            while "event=bootstrap_unreachable" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert process.poll() is None, "the daemon must keep running"
            warnings = [line for line in log_path.read_text().splitlines() if "bootstrap_unreachable" in line]
            assert warnings and "retry_in_s=" in warnings[0] and unreachable in warnings[0]
            assert "connection refused" in warnings[0]
            assert node.get("/v1/health")["status"] == "ok"
        finally:
            stop_daemon(process)
        assert "Traceback" not in log_path.read_text()


def test_testnet_command_forms_a_mesh(tmp_path):
    result = cli("testnet", "--nodes", "3", "--base-dir", str(tmp_path), "--model", "none", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "mesh of 3 nodes formed" in result.stdout
    assert result.stdout.count("2 peer(s) connected") == 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_testnet_keep_stops_its_daemons_on_sigterm(tmp_path):
    """kill / systemd / docker stop send SIGTERM: the daemons (in sessions of their own) must stop too."""
    process = subprocess.Popen(
        [*CLI, "testnet", "--nodes", "2", "--keep", "--base-dir", str(tmp_path), "--model", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    pids: list[int] = []
    try:
        output = ""
        deadline = time.monotonic() + 60
        while "mesh running" not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, output  # exited early
            output += line
        pids = [json.loads((tmp_path / f"node-{i}" / "daemon.json").read_text())["pid"] for i in range(2)]
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
        left_running = [pid for pid in pids if _alive(pid)]
    finally:
        process.kill()
        for pid in pids:  # a failed run leaves nothing behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "stopped 2 nodes" in rest, (process.returncode, output + rest)
    assert not left_running
    assert not any(tmp_path.glob("node-*/daemon.json"))  # each daemon stopped cleanly and removed its state


def test_help_lists_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("start", "id", "peers", "status", "testnet"):
        assert command in result.stdout


def test_start_help_shows_each_default():
    result = cli("start", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    # rich markup would swallow a bare "[default: ...]"
    for shown in ("[default: 7700]", "[default: embedded]", "[default: /ip4/0.0.0.0/tcp/4001]",
                  "[default: 256 MiB]", f"[default: {default_data_dir()}]"):
        assert shown in result.stdout


def test_example_data_deals_each_node_its_slice_of_one_family(tmp_path: Path):
    from knexa.node.learn import tasks

    slices = []
    for node in range(3):
        out = tmp_path / f"node{node}.jsonl"
        result = cli("example-data", str(out), "--node", str(node), "--nodes", "3", "--seed", "5")
        assert result.returncode == 0, result.stderr
        # The daemon's own family: nothing to configure.
        assert f"examples to {out}" in result.stdout and "learn_task_family" not in result.stdout
        slices.append(tasks.load_jsonl(out))
    # Every example of the deal once, each node a skewed share: what `learn --data` reads.
    dealt = sorted(e.prompt for s in slices for e in s)
    assert dealt == sorted(e.prompt for e in tasks.public_validation(80, seed=5, family="learnable"))
    assert all(tasks.category_of(e.prompt) == e.category for s in slices for e in s)
    result = cli("example-data", str(tmp_path / "hard.jsonl"), "--family", "hard")
    assert result.returncode == 0 and 'learn_task_family = "hard"' in result.stdout
    assert_one_line_error(cli("example-data", str(tmp_path / "x"), "--node", "3", "--nodes", "3"), "--node")
    assert_one_line_error(cli("example-data", str(tmp_path / "x"), "--family", "easy"), "hard, learnable")
    assert_one_line_error(cli("example-data", str(tmp_path / "no" / "x.jsonl")), "cannot write")
    assert not (tmp_path / "x").exists()


def test_config_file_sets_flags_and_flags_override(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[node]\nlisten = ["/ip4/127.0.0.1/tcp/4999"]\napi_port = 7799\n')
    result = cli("id", "--json", "--config", str(config), "--data-dir", str(tmp_path))
    assert json.loads(result.stdout)["listen_addrs"] == ["/ip4/127.0.0.1/tcp/4999"]
