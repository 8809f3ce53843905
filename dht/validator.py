"""The py-libp2p Validator for the ``/knexa/`` namespace, over the signed envelopes."""

from __future__ import annotations

from libp2p.records.validator import Validator

from knexa.dht.envelope import select_best, verify_record


class KnexaRecordValidator(Validator):
    """Accepts only unexpired records signed by the peer named in the key."""

    def validate(self, key: str, value: bytes) -> None:
        verify_record(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return select_best(key, values)
