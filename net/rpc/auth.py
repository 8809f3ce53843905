"""Receive policy for signed envelopes on a live connection (sans-IO)."""

from __future__ import annotations

from knexa.net.rpc.envelope import Envelope, KeyCache, verify_signature
from knexa.net.rpc.errors import ErrorCode, RpcError
from knexa.net.rpc.replay import ReplayCache


class EnvelopeAuthenticator:
    """Checks an envelope received from `conn_peer` on a connection to `local_peer`.

    In order: the signer is the authenticated connection peer, the signature is
    valid, the envelope is addressed to us, its timestamp lies within the skew
    window and its nonce is fresh. The nonce is remembered only after the
    signature checks out, so forged traffic cannot fill the replay cache.
    """

    def __init__(
        self,
        local_peer: bytes,
        *,
        skew_ms: int,
        replay_cache_size: int = 100_000,
        keys: KeyCache | None = None,
    ) -> None:
        self.local_peer = local_peer
        self.skew_ms = skew_ms
        self.keys = keys or KeyCache()
        self.replay = ReplayCache(window_ms=skew_ms, max_entries=replay_cache_size)

    def check(self, env: Envelope, conn_peer: bytes, now_ms: int) -> None:
        if env.sender != conn_peer:
            raise RpcError(ErrorCode.UNAUTHORIZED, "envelope signer is not the connection peer")
        verify_signature(env, self.keys)
        if env.recipient != self.local_peer:
            raise RpcError(ErrorCode.UNAUTHORIZED, "envelope addressed to another peer")
        if abs(now_ms - env.ts_ms) > self.skew_ms:
            raise RpcError(ErrorCode.UNAUTHORIZED, "envelope timestamp outside the skew window")
        if not self.replay.check_and_add(env.sender + env.nonce, env.ts_ms, now_ms):
            raise RpcError(ErrorCode.UNAUTHORIZED, "replayed envelope (nonce already seen)")
