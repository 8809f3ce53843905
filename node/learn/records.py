"""Learning records read from the ledger on every tick, parsed once per version. Pure code.

Every node reads the member, state and reward records of the whole mesh each tick. A matchmaker state is up
to 48 KiB of msgpack; parsing it again when nothing changed is wasted work, and a bad record seen on every
tick must be counted once, not once per tick. A version is an entry's content hash: the signed bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from msgpack import UnpackException

from knexa.crdt.entry import Entry, unpack_payload

T = TypeVar("T")
MAX_VERSIONS = 4096  # per topic: far above the live records of any mesh, so current ones stay cached


class RecordRefused(ValueError):
    """A well-formed record that must still not count; its message is the reason shown in status."""


@dataclass(frozen=True)
class _Bad:
    reason: str


class ParsedRecords(Generic[T]):
    """The parsed record of each author for one topic. `parse(author, record)` runs once per version; a
    version that fails (ValueError, KeyError, TypeError; RecordRefused for its own reason) is reported to
    `on_bad` once and left out of every later read."""

    def __init__(self, parse: Callable[[str, object], T], bad_reason: str, on_bad: Callable[[str], None],
                 max_versions: int = MAX_VERSIONS) -> None:
        self._parse, self._bad_reason, self._on_bad = parse, bad_reason, on_bad
        self._max_versions = max_versions
        self._versions: OrderedDict[tuple[str, bytes], T | _Bad] = OrderedDict()

    def read(self, entries: Mapping[str, Entry]) -> dict[str, T]:
        out: dict[str, T] = {}
        for author, entry in entries.items():
            key = (author, entry.content_hash)
            parsed = self._versions.get(key)
            if parsed is None:
                parsed = self._parse_once(author, entry)
                self._versions[key] = parsed
                if len(self._versions) > self._max_versions:
                    self._versions.popitem(last=False)
            else:
                self._versions.move_to_end(key)
            if not isinstance(parsed, _Bad):
                out[author] = parsed
        return out

    def _parse_once(self, author: str, entry: Entry) -> T | _Bad:
        try:
            return self._parse(author, unpack_payload(entry.payload))
        except RecordRefused as exc:
            bad = _Bad(str(exc))
        except (ValueError, KeyError, TypeError, UnpackException):
            bad = _Bad(self._bad_reason)
        self._on_bad(bad.reason)
        return bad
