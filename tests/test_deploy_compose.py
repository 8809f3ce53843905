"""The compose testnet's structure (Docker is not on the CI machine, so it is not run here):
services, networks, NAT routers, and every knexa-node command and flag it uses exist in the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from knexa.cli.main import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _cli_options() -> dict[str, set[str]]:
    import typer.main

    group = typer.main.get_command(app)
    return {
        name: {opt for param in cmd.params for opt in getattr(param, "opts", [])}
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }


def test_services_and_networks() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"relay", "router1", "router2", "home1", "home2"} <= set(services)
    assert set(compose["networks"]) == {"public", "home1", "home2"}
    assert all(net.get("internal") for net in compose["networks"].values())  # nothing leaves the host
    subnets = {name: net["ipam"]["config"][0]["subnet"] for name, net in compose["networks"].items()}
    assert subnets == {"public": "100.64.0.0/24", "home1": "192.168.1.0/24", "home2": "192.168.2.0/24"}
    # The relay is public only; each home node sits only on its home network, behind its router.
    assert set(services["relay"]["networks"]) == {"public"}
    for index in (1, 2):
        router, home = services[f"router{index}"], services[f"home{index}"]
        assert set(router["networks"]) == {"public", f"home{index}"}
        assert router["sysctls"]["net.ipv4.ip_forward"] == "1"
        assert "NET_ADMIN" in router["cap_add"]
        assert home["networks"] == [f"home{index}"]
        gateway = router["networks"][f"home{index}"]["ipv4_address"]
        assert home["command"] == ["node", gateway]
        # Home nodes carry no fixed address: `--scale homeN=K` works.
        assert "container_name" not in home and "ipv4_address" not in str(home["networks"])
    assert "${NAT2_FLAGS" in (DEPLOY / "docker-compose.yml").read_text()  # scenario (b): --random-fully


def test_dockerfile_builds_what_the_compose_file_runs() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    compose = _compose()
    build = compose["services"]["relay"]["build"]
    assert build["dockerfile"] == "deploy/Dockerfile" and build["context"] == ".."
    for tool in ("iproute2", "iptables"):
        assert tool in dockerfile
    for folder in ("node", "net", "crdt", "dht", "cli"):
        assert f"COPY {folder} {folder}" in dockerfile
    assert "compose-entrypoint" in dockerfile


def test_every_knexa_command_and_flag_in_the_testnet_exists() -> None:
    options = _cli_options()
    sources = (DEPLOY / "compose-entrypoint.sh").read_text() + (DEPLOY / "docker-compose.yml").read_text()
    # Join shell continuation lines, then check each `knexa-node CMD --flag ...` use.
    text = sources.replace("\\\n", " ")
    uses = re.findall(r"knexa-node\s+([a-z]+)([^\n;|&)]*)", text)
    assert {cmd for cmd, _ in uses} >= {"start", "status", "connect"}
    for cmd, rest in uses:
        assert cmd in options, f"knexa-node {cmd} is not a command"
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
            assert flag in options[cmd], f"knexa-node {cmd} has no option {flag}"
