"""A map of last-writer-wins registers: per key, the entry with the greatest version wins.

Deletion is a tombstone entry (it must win like any write, or an older value
would come back). Merge is a per-key maximum, hence commutative, associative
and idempotent. Expiry is a view over the state, not a change to it, so every
replica sees the same live set for the same `now`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from knexa.crdt.entry import NEVER_EXPIRES, Entry

Version = tuple[int, int, str, bytes]


class LWWMap:
    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: dict[str, Entry] = {}
        # Versions of keys dropped by `prune`: an older copy of a pruned entry,
        # still held by a lagging replica, must not come back to life here.
        self._floors: dict[str, Version] = {}
        for entry in entries:
            self.apply(entry)

    def apply(self, entry: Entry) -> bool:
        """Merge one entry; True if it is new here and now the key's winner."""
        current = self._entries.get(entry.key)
        if current is not None:
            if entry.version <= current.version:
                return False
        else:
            floor = self._floors.get(entry.key)
            if floor is not None and entry.version <= floor:
                return False
        self._entries[entry.key] = entry
        return True

    def merged(self, other: LWWMap) -> LWWMap:
        result = LWWMap(self._entries.values())
        for entry in other._entries.values():
            result.apply(entry)
        return result

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def version_of(self, key: str) -> Version | None:
        entry = self._entries.get(key)
        return entry.version if entry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LWWMap):
            return NotImplemented
        return self._entries == other._entries

    __hash__ = None  # type: ignore[assignment]  # mutable

    def live(self, now_ms: int, prefix: str = "") -> Iterator[Entry]:
        for entry in self._entries.values():
            if entry.key.startswith(prefix) and entry.is_live(now_ms):
                yield entry

    def prune(self, now_ms: int, grace_ms: int) -> list[str]:
        """Drop entries expired for longer than `grace_ms`; return their keys.

        The grace period lets the expired entry (acting as a tombstone) reach
        replicas that still hold older versions before it is forgotten.
        """
        dropped = [
            key
            for key, e in self._entries.items()
            if e.expires_at_ms != NEVER_EXPIRES and e.expires_at_ms + grace_ms <= now_ms
        ]
        for key in dropped:
            self._floors[key] = self._entries.pop(key).version
        return dropped
