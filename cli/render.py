"""Human-readable views of what the API returns."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table


def short_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:6]}…{peer_id[-6:]}"


def ago(then: float, now: float | None = None) -> str:
    seconds = max(0, int((now or time.time()) - then))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def peers_table(peers: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PEER", "ADDRESS", "KIND", "DIR", "RTT", "SINCE", "AGENT"):
        table.add_column(column, no_wrap=True)
    for peer in peers:
        rtt = "-" if peer.get("rtt_ms") is None else f"{peer['rtt_ms']:.1f}ms"
        table.add_row(
            short_id(peer["peer_id"]),
            peer["address"],
            peer["kind"],
            "in" if peer["direction"] == "inbound" else "out",
            rtt,
            ago(peer["connected_at"]),
            (peer.get("agent") or "-").split(" ")[0],
        )
    return table


def print_peers(console: Console, node: dict[str, Any], peers: list[dict[str, Any]]) -> None:
    console.print(
        f"[bold]{short_id(node['peer_id'])}[/bold] (this node) · {len(peers)} peer(s) connected",
        highlight=False,
    )
    if peers:
        console.print(peers_table(peers))


def print_status(console: Console, node: dict[str, Any]) -> None:
    rows = [
        ("peer id", node["peer_id"]),
        ("version", node["agent"]),
        ("uptime", ago(node["started_at"])),
        ("peers", str(node["peers_connected"])),
        ("listening", "\n".join(node["listen_addrs"]) or "-"),
        ("observed", "\n".join(node["observed_addrs"]) or "-"),
        ("bootstrap", "\n".join(node["bootstrap"]) or "-"),
        ("traffic", f"{human_bytes(node['bytes_in'])} in, {human_bytes(node['bytes_out'])} out"),
        ("local API", node["api"]),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
