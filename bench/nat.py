"""NAT traversal figures from the namespace testbed (root; see deploy/netns-testnet).

    sudo .venv/bin/python bench/nat.py [--runs 3]

Per run of scenario (a), two homes behind port-preserving MASQUERADE routers:
time from first contact (the relayed connect) to a verified direct connection, and
signed-RPC echo over the direct path. Per run of scenario (b), home 2 behind a
port-randomizing router: the same echo over the relayed path. Every echo reply is
compared with its request. Medians over the runs, each run's figures too.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from knexa.net.nat.netns import unavailable_reason
from knexa.net.nat.testbed import ScenarioFailed, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    quiet = lambda line: None  # noqa: E731 - the scenarios' own narration is not wanted here
    direct, relayed = [], []
    for i in range(args.runs):
        try:
            a = run("a", out=quiet)
            b = run("b", out=quiet)
        except ScenarioFailed as exc:
            print(f"run {i + 1}: FAILED: {exc}")
            continue
        direct.append(a)
        relayed.append(b)
        print(f"run {i + 1}: first contact -> direct {a['first_contact_to_direct_s']:.2f}s "
              f"(relayed connect {a['relay_connect_s'] * 1000:.0f} ms); direct RPC "
              f"{a['rpc_direct']['bulk']['mib_per_s']:.1f} MiB/s, "
              f"1 KiB p50 {a['rpc_direct']['small']['p50_ms']:.2f} ms;"
              f" relayed RPC {b['rpc_relayed']['bulk']['mib_per_s']:.1f} MiB/s, "
              f"1 KiB p50 {b['rpc_relayed']['small']['p50_ms']:.2f} ms; punches through random-fully: "
              f"{b['punch_succeeded']}/{b['punch_attempts']} ok")
    if not direct:
        return 1

    def med(rows: list[dict], *path: str) -> float:
        values = []
        for row in rows:
            for key in path:
                row = row[key]
            values.append(row)
        return statistics.median(values)

    print(f"\nmedian of {len(direct)} run(s):")
    print(f"  first contact -> direct connection (hole punch): {med(direct, 'first_contact_to_direct_s'):.2f} s")
    for label, rows, key in (("direct", direct, "rpc_direct"), ("relayed", relayed, "rpc_relayed")):
        print(f"  RPC over the {label} path: 256 KiB echo {med(rows, key, 'bulk', 'mib_per_s'):.1f} MiB/s each way; "
              f"1 KiB echo p50 {med(rows, key, 'small', 'p50_ms'):.2f} ms, "
              f"p99 {med(rows, key, 'small', 'p99_ms'):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
