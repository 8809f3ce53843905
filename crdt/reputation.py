"""Reputation reports one node writes about another, and their aggregate per subject.

A report lives under the reporter's own namespace (`report/<reporter>/<subject>`),
so each reporter holds exactly one current opinion per subject and a newer
report replaces the older one; nobody can stuff the ballot under another name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from knexa.crdt.entry import canonical_packb, unpack_payload
from knexa.crdt.schema import SchemaError, as_dict, get_float, get_str

NEUTRAL_SCORE = 0.5
# Weight of the neutral prior, in reports: one report cannot swing a stranger's
# reputation to an extreme.
PRIOR_WEIGHT = 2.0
MAX_REASON_CHARS = 256


class ReportError(ValueError):
    """A report payload is invalid."""


@dataclass(frozen=True)
class Report:
    """`score` in [0, 1]: 0 caught cheating or failing, 1 consistently good."""

    score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Any) -> Report:
        try:
            d = as_dict(raw, "report")
            return cls(get_float(d, "score", 0.0, 1.0), get_str(d, "reason", MAX_REASON_CHARS))
        except SchemaError as exc:
            raise ReportError(str(exc)) from None

    def to_payload(self) -> bytes:
        return canonical_packb(self.to_dict())


def report_from_payload(payload: bytes) -> Report:
    try:
        raw = unpack_payload(payload)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ReportError("report payload is not msgpack") from exc
    return Report.from_dict(raw)


@dataclass(frozen=True)
class Reputation:
    subject: str
    score: float
    report_count: int


def aggregate_reputation(subject: str, reports: Iterable[tuple[str, Report]]) -> Reputation:
    """Combine (reporter, report) pairs into one score, a mean shrunk toward neutral.

    Self-reports are ignored: a node vouching for itself says nothing.
    """
    scores = [r.score for reporter, r in reports if reporter != subject]
    total = sum(scores) + NEUTRAL_SCORE * PRIOR_WEIGHT
    return Reputation(subject, total / (len(scores) + PRIOR_WEIGHT), len(scores))
