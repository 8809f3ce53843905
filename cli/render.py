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
    for column in ("PEER", "ADDRESS", "KIND", "DIR", "RTT", "SINCE", "MODEL", "DEVICE", "LOAD", "AGENT"):
        table.add_column(column, no_wrap=True)
    for peer in peers:
        rtt = "-" if peer.get("rtt_ms") is None else f"{peer['rtt_ms']:.1f}ms"
        profile = peer.get("profile") or {}
        load = "-" if not profile else f"q{profile['queue_length']}"
        table.add_row(
            short_id(peer["peer_id"]),
            peer["address"],
            peer["kind"],
            "in" if peer["direction"] == "inbound" else "out",
            rtt,
            ago(peer["connected_at"]),
            ",".join(profile.get("models") or []) or "-",
            profile.get("device") or "-",
            load,
            (peer.get("agent") or "-").split(" ")[0],
        )
    return table


def known_peers_table(known: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PEER", "REACHABILITY", "MODEL", "DEVICE", "LOAD", "PROFILE UPDATED"):
        table.add_column(column, no_wrap=True)
    for peer in known:
        profile = peer["profile"]
        table.add_row(
            short_id(peer["peer_id"]),
            profile["reachability"],
            ",".join(profile["models"]) or "-",
            profile["device"] or "-",
            f"q{profile['queue_length']}",
            ago(peer["updated_at"]) + " ago",
        )
    return table


def print_peers(
    console: Console, node: dict[str, Any], peers: list[dict[str, Any]], known: list[dict[str, Any]] | None = None
) -> None:
    console.print(
        f"[bold]{short_id(node['peer_id'])}[/bold] (this node) · {len(peers)} peer(s) connected",
        highlight=False,
    )
    if peers:
        console.print(peers_table(peers))
    if known:
        console.print(f"\n{len(known)} more in the ledger, not connected (dialled when needed):", highlight=False)
        console.print(known_peers_table(known))


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
        ("ledger", _ledger_line(node.get("ledger"))),
        ("engine", _engine_line(node.get("engine"))),
        ("dht", _dht_line(node.get("dht"))),
        ("collab", _collab_line(node.get("collab"))),
        ("learning", _learn_line(node.get("learn"))),
        ("reachability", _nat_line(node.get("nat"))),
        ("relays", _relay_line(node.get("nat"))),
        ("local API", node["api"]),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def ledger_table(entries: list[dict[str, Any]], now_ms: float | None = None) -> Table:
    now_ms = now_ms if now_ms is not None else time.time() * 1000
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("KIND", "AUTHOR", "KEY", "CLOCK", "EXPIRES", "STATUS", "VALUE"):
        table.add_column(column, no_wrap=True)
    for entry in sorted(entries, key=lambda e: (e["kind"], e["key"])):
        expires = entry["expires_at_ms"]
        expires_in = "never" if not expires else f"in {max(0, int((expires - now_ms) / 1000))}s"
        clock = entry["clock"]
        table.add_row(
            entry["kind"],
            short_id(entry["author"]),
            _short_key(entry["key"]),
            f"{time.strftime('%H:%M:%S', time.gmtime(clock['wall_ms'] / 1000))}.{clock['counter']}",
            expires_in,
            ("verified" if entry["verified"] else "UNVERIFIED") + (" deleted" if entry["deleted"] else ""),
            _value_summary(entry),
        )
    return table


def _short_key(key: str) -> str:
    return "/".join(short_id(part) if part.startswith(("12D3", "Qm")) else part for part in key.split("/"))


def _value_summary(entry: dict[str, Any]) -> str:
    value = entry.get("value")
    if entry["deleted"]:
        return "(retracted)"
    if entry["kind"] == "profile" and isinstance(value, dict):
        models = ",".join(m["name"] for m in value.get("models", [])) or "no model"
        return f"{value['device']['backend']} · {models} · queue {value['load']['queue_length']}"
    if entry["kind"] == "report" and isinstance(value, dict):
        return f"score {value.get('score')} · {value.get('reason', '')}"[:60]
    return str(value)[:60]


def _ledger_line(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    rejected = sum(stats["rejected"].values())
    return (
        f"{stats['entries']} entries, {rejected} rejected, "
        f"{stats['syncs_ok']} syncs ok, {stats['syncs_failed']} failed"
    )


def _collab_line(collab: dict[str, Any] | None) -> str:
    if not collab:
        return "-"
    checks = collab["verification"]
    return (
        f"queue {collab['queue_length']}/{collab['queue_capacity']}, admitted {collab['admitted']} "
        f"({collab['admitted_rate']:.2f}/s), rejected {collab['rejected']}"
        f"{'' if collab['enabled'] else ' (admission off)'}; "
        f"verified {checks['checks']}, failed {checks['failures']}"
    )


def _learn_line(learn: dict[str, Any] | None) -> str:
    if not learn:
        return "-"
    if learn["phase"] == "idle":
        return "not enrolled (knexa-node learn --data FILE)"
    if learn["accuracy"] is None:
        return learn["phase"]
    role = f" ({learn['role']['role']})" if learn["role"] else ""
    return (f"{learn['phase']}, validation accuracy {learn['accuracy']:.2f}, {len(learn['members'])} members, "
            f"round {learn['round']}{role}")


def _engine_line(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "none (started with model = none)"
    if engine["state"] != "ready":
        return f"{engine['state']}" + (f": {engine['reason']}" if engine.get("reason") else "")
    speed = f"{engine['tokens_per_s']:.1f} tok/s" if engine.get("tokens_per_s") else "no requests yet"
    return (
        f"{engine['model']} on {engine['device']} ({engine['dtype']}), queue {engine['queue_length']}, "
        f"{engine['requests_served']} served, {speed}"
    )


def _nat_line(nat: dict[str, Any] | None) -> str:
    if not nat:
        return "-"
    votes = nat["autonat_votes"]
    how = "set by config" if nat["reachability_mode"] != "auto" else (
        f"AutoNAT: {votes['ok']} dial-back(s) ok, {votes['error']} failed")
    punches = nat["hole_punches"]
    punched = f"; hole punches {sum(p['ok'] for p in punches)}/{len(punches)} ok" if punches else ""
    return f"{nat['reachability']} ({how}){punched}"


def _relay_line(nat: dict[str, Any] | None) -> str:
    if not nat:
        return "-"
    lines = []
    if nat["relay_service"]:
        lim = nat["relay_limits"]
        lines.append(
            f"serving as a relay (up to {lim['max_reservations']} reservations of {lim['reservation_ttl_s']}s; "
            f"circuits up to {lim['max_circuit_duration_s']}s and {human_bytes(lim['max_circuit_bytes'])})"
        )
    for r in nat["reservations"]:
        state = f"reserved, renews in {r['renew_in_s']:.0f}s" if r["state"] == "active" else (
            f"{r['state']}" + (f": {r['last_error']}" if r["last_error"] else ""))
        lines.append(f"{short_id(r['relay'])}: {state}")
    lines += nat["relay_addrs"]
    return "\n".join(lines) or "-"


def _dht_line(dht: dict[str, Any] | None) -> str:
    if not dht:
        return "-"
    return (
        f"{dht['mode']}, routing table {dht['routing_table_size']}, "
        f"{dht['provided_keys']} keys provided, {dht['lookups_done']} lookups ({dht['lookups_failed']} failed)"
    )
