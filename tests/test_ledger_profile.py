"""The capability profile schema, reports and the reputation aggregate."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import msgpack
import pytest

from knexa.crdt.entry import canonical_packb
from knexa.crdt.profile import SCHEMA_VERSION, CapabilityProfile, ProfileError
from knexa.crdt.reputation import Report, ReportError, aggregate_reputation

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import KEY_PAIRS, FakeClock, make_ledger, resign, sample_profile


def test_profile_round_trips_through_msgpack() -> None:
    profile = sample_profile()
    raw = msgpack.unpackb(msgpack.packb(profile.to_dict()))
    assert CapabilityProfile.from_dict(raw) == profile
    assert profile.skill("code") == 0.7 and profile.skill("poetry") == 0.0


def test_profile_payload_is_canonical() -> None:
    a = sample_profile().to_dict()
    b = dict(reversed(list(a.items())))
    assert canonical_packb(a) == canonical_packb(b)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("device", "backend"), "tpu-from-mars"),
        (("device", "memory_bytes"), -1),
        (("throughput", "tokens_per_s"), math.nan),
        (("load", "queue_length"), 1.5),
        (("reachability", "status"), "maybe"),
        (("skills",), {"code": 2.0}),
        (("skills",), {"": 0.5}),
        (("models",), [{"name": "m"}]),
        (("adapters",), [{"adapter_id": "a", "base_model": "m", "rank": 0, "version": 1,
                          "domain_tags": []}]),
        (("schema_version",), 0),
        (("device",), None),
    ],
)
def test_invalid_profiles_are_refused(path: tuple[str, ...], bad: object) -> None:
    raw = sample_profile().to_dict()
    target = raw
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = bad
    with pytest.raises(ProfileError):
        CapabilityProfile.from_dict(raw)


def test_ledger_refuses_to_sign_an_invalid_profile() -> None:
    ledger = make_ledger(0, FakeClock())
    with pytest.raises(ProfileError):
        ledger.put_profile(CapabilityProfile(skills=(("code", 3.0),)))
    assert ledger.entries() == []


def test_newer_schema_profile_is_relayed_but_not_shown() -> None:
    clock = FakeClock()
    newer_node, old_node = make_ledger(1, clock), make_ledger(0, clock)
    entry = newer_node.put_profile(sample_profile())
    future_payload = {**sample_profile().to_dict(), "schema_version": SCHEMA_VERSION + 1}
    newer = resign(entry, KEY_PAIRS[1], payload=canonical_packb(future_payload), counter=1)
    assert old_node.merge([newer]).accepted == [newer]
    assert old_node.profiles() == {}
    assert old_node.entries() == [newer]


def test_reports_validate_their_score() -> None:
    with pytest.raises(ReportError):
        Report.from_dict({"score": 1.5, "reason": ""})
    with pytest.raises(ReportError):
        Report.from_dict({"score": 0.5})
    with pytest.raises(ReportError):
        make_ledger(0, FakeClock()).put_report("someone", -0.1, "")


def test_reputation_is_a_mean_shrunk_toward_neutral_ignoring_self_reports() -> None:
    reports = [("a", Report(1.0, "")), ("b", Report(1.0, "")), ("s", Report(1.0, "self"))]
    reputation = aggregate_reputation("s", reports)
    assert reputation.report_count == 2
    assert reputation.score == pytest.approx((2 * 1.0 + 2 * 0.5) / 4)
    assert aggregate_reputation("s", []).score == 0.5


def test_ledger_reputation_uses_each_reporters_latest_report() -> None:
    clock = FakeClock()
    subject, r1, r2, observer = (make_ledger(i, clock) for i in range(4))
    observer.merge([r1.put_report(subject.peer_id, 0.0, "timeout")])
    observer.merge([r1.put_report(subject.peer_id, 1.0, "recovered")])
    observer.merge([r2.put_report(subject.peer_id, 1.0, "good answers")])
    observer.merge([r2.put_report(r1.peer_id, 0.0, "unrelated subject")])
    reputation = observer.reputation(subject.peer_id)
    assert reputation.report_count == 2
    assert reputation.score == pytest.approx(3 / 4)
    assert observer.reports_about(subject.peer_id)[r1.peer_id].reason == "recovered"
