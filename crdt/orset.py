"""An observed-remove set: concurrent add and remove of the same element keeps it.

Each add carries a unique tag; a remove deletes only the tags it has observed,
so an add it never saw survives. State and deltas are the same type, and
merge is set union on both parts.

In the ledger each (element, tag) pair is an entry `orset/<set>/<author>/<tag>`
written by the adding author, and a remove is that entry's tombstone; the
namespace rule then means only the adder may remove its own tags.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from knexa.crdt.entry import Entry


@dataclass(frozen=True)
class ORSet:
    adds: frozenset[tuple[str, str]] = frozenset()  # (element, tag)
    removed: frozenset[str] = frozenset()  # tags

    def add(self, element: str, tag: str) -> ORSet:
        """The delta adding `element` under a tag nobody else will ever use."""
        return ORSet(adds=frozenset({(element, tag)}))

    def remove(self, element: str) -> ORSet:
        """The delta removing every tag of `element` observed in this state."""
        return ORSet(removed=frozenset(tag for e, tag in self.adds if e == element))

    def merge(self, other: ORSet) -> ORSet:
        return ORSet(self.adds | other.adds, self.removed | other.removed)

    def elements(self) -> frozenset[str]:
        return frozenset(e for e, tag in self.adds if tag not in self.removed)

    def __contains__(self, element: object) -> bool:
        return any(e == element and tag not in self.removed for e, tag in self.adds)

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], now_ms: int) -> ORSet:
        """The set held by ledger entries of one set name; expired adds count as removed."""
        adds: set[tuple[str, str]] = set()
        removed: set[str] = set()
        for entry in entries:
            tag = entry.key.split("/", 2)[2]  # "<author>/<tag>": unique across authors
            if entry.is_live(now_ms):
                element = entry.value()
                if isinstance(element, str):
                    adds.add((element, tag))
            else:
                removed.add(tag)
        return cls(frozenset(adds), frozenset(removed))
