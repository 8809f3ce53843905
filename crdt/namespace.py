"""Who may write which key: the single rule that keeps authors in their own namespace.

Keys are '/'-separated paths whose first segment is the entry kind. Each kind
names the segment that holds the owner's peer id; only that peer may write it.

    profile/<owner>
    report/<owner>/<subject>
    orset/<set name>/<owner>/<tag>
    learn/<owner>/<topic>        (learning together: membership, matchmaker state, rewards)
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    PROFILE = "profile"
    REPORT = "report"
    ORSET = "orset"
    LEARN = "learn"


# kind -> (number of segments, index of the owner segment)
_LAYOUT: dict[str, tuple[int, int]] = {
    Kind.PROFILE: (2, 1),
    Kind.REPORT: (3, 1),
    Kind.ORSET: (4, 2),
    Kind.LEARN: (3, 1),
}

MAX_SEGMENT_CHARS = 128


def owner_of(key: str) -> str | None:
    """The peer id allowed to write `key`, or None if the key is not well formed."""
    segments = key.split("/")
    layout = _LAYOUT.get(segments[0])
    if layout is None or len(segments) != layout[0]:
        return None
    if any(not s or len(s) > MAX_SEGMENT_CHARS for s in segments):
        return None
    return segments[layout[1]]


def kind_of(key: str) -> Kind:
    return Kind(key.split("/", 1)[0])


def profile_key(owner: str) -> str:
    return f"{Kind.PROFILE}/{owner}"


def report_key(reporter: str, subject: str) -> str:
    return f"{Kind.REPORT}/{reporter}/{subject}"


def orset_key(set_name: str, owner: str, tag: str) -> str:
    return f"{Kind.ORSET}/{set_name}/{owner}/{tag}"


def orset_prefix(set_name: str) -> str:
    return f"{Kind.ORSET}/{set_name}/"


def learn_key(owner: str, topic: str) -> str:
    return f"{Kind.LEARN}/{owner}/{topic}"
