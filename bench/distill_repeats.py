"""Does a pair taught again gain less than a pair meeting for the first time? Read from bench/distill.py's output.

    python bench/distill.py ... | tee run.txt
    python bench/distill_repeats.py run.txt other.txt

bench/distill.py prints each round's pairs with the teacher's lead, the student's validation gain and its loss
drop. A pair is a repeat when the same two agents (either way round) were paired in an earlier round of the same
condition and seed. Round 1 has no repeats and gains far more than later rounds, so repeats are compared with
the first meetings of rounds 2 and later.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROUND_LINE = re.compile(r"^\s+(?P<condition>\w+)\s+round (?P<round>\d+): test accuracy [\d.]+\s+pairs (?P<pairs>.*)$")
PAIR = re.compile(r"(?P<teacher>\S+)->(?P<student>\S+) \(lead (?P<lead>[\d.]+), gain (?P<gain>[+-][\d.]+), "
                  r"loss drop (?P<drop>[+-][\d.]+)")


@dataclass(frozen=True)
class TaughtPair:
    source: str
    condition: str
    round_no: int
    lead: float
    gain: float
    loss_drop: float
    repeat: bool


def taught_pairs(source: str, lines: Iterable[str]) -> list[TaughtPair]:
    """Every pair of every round in one run's output; a new `seed N:` line starts a new history."""
    met: set[tuple[str, frozenset[str]]] = set()
    pairs = []
    for line in lines:
        if line.startswith("seed "):
            met.clear()
        row = ROUND_LINE.match(line)
        if row is None:
            continue
        for p in PAIR.finditer(row["pairs"]):
            key = (row["condition"], frozenset((p["teacher"], p["student"])))
            pairs.append(TaughtPair(source, row["condition"], int(row["round"]), float(p["lead"]),
                                    float(p["gain"]), float(p["drop"]), key in met))
            met.add(key)
    return pairs


def describe(label: str, pairs: Sequence[TaughtPair]) -> str:
    if len(pairs) < 2:
        return f"{label:34s} {len(pairs):3d} pair(s)"
    gains = [p.gain for p in pairs]
    sem = statistics.stdev(gains) / len(gains) ** 0.5
    return (f"{label:34s} {len(pairs):3d} pairs  gain {statistics.fmean(gains):+.3f} ± {sem:.3f}  "
            f"loss drop {statistics.fmean(p.loss_drop for p in pairs):+.3f}  "
            f"lead {statistics.fmean(p.lead for p in pairs):.2f}")


def report(pairs: Sequence[TaughtPair]) -> None:
    conditions = sorted({p.condition for p in pairs})
    for condition in (None, *conditions):
        chosen = [p for p in pairs if condition in (None, p.condition)]
        name = condition or "all"
        print(describe(f"{name}: round 1", [p for p in chosen if p.round_no == 1]))
        print(describe(f"{name}: first meetings, rounds 2+", [p for p in chosen if p.round_no > 1 and not p.repeat]))
        print(describe(f"{name}: repeats", [p for p in chosen if p.repeat]))
    for p in pairs:
        if p.repeat:
            print(f"  repeat: {p.source} {p.condition} round {p.round_no}: lead {p.lead:.2f}, gain {p.gain:+.3f}, "
                  f"loss drop {p.loss_drop:+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="bench/distill.py's printed output, one file a run")
    args = parser.parse_args()
    report([p for path in args.outputs for p in taught_pairs(path.name, path.read_text().splitlines())])


if __name__ == "__main__":
    main()
