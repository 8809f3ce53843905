"""`ask --collab kv`: answer a query here, using the best KV path the mesh offers, and say which one.

Order: a prefix cache of the prompt from a peer of the same model (or this node's own store); else a peer of
another model for which this node has a fuser (fused caches); else a peer of another model (text hint); else
local. A failing peer path falls through to the next, ending in a local answer. Private mode skips the prefix
lookup (its DHT keys and fetch requests are hashes and tokens of the prompt itself) and sends peers only the
query as this node's model rephrased it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import RpcError, TensorCodecError
from knexa.node.engine import EngineError, GenerationRequest, SamplingParams

from .exchange import ExchangeOutcome, KvExchange, PrivacyRefused
from .fuser import FuserError
from .protocol import PrefixRefused
from .service import PATH_LOCAL, KvShareService

log = logging.getLogger("knexa.kvshare")


@dataclass(frozen=True)
class PeerModel:
    """A peer and the model it serves (from its ledger profile)."""

    peer_id: str
    name: str
    weights_hash: str


@dataclass
class KvAnswer:
    text: str
    path: str  # prefix-hit, local-cache, fused, text-hint, local
    peer: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    attempts: list[str] = field(default_factory=list)  # peer paths tried and why they were not used
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def kv_ask(
    kvshare: KvShareService,
    exchange: KvExchange,
    query: str,
    params: SamplingParams,
    peers: Sequence[PeerModel],
    *,
    private: bool = False,
) -> KvAnswer:
    started = time.perf_counter()
    engine = kvshare.require_engine()
    mine = (engine.status().get("model") or {}).get("weights_sha256")
    ids = kvshare.token_ids(messages=[{"role": "user", "content": query}]) if engine.tokenizer().chat_template \
        else kvshare.token_ids(prompt=query)
    attempts: list[str] = []
    outcome = None
    if not private:
        outcome = await kvshare.prefill(ids)
        if outcome.path != PATH_LOCAL:
            result = await engine.generate_from_cache(outcome.tensors, outcome.metadata,
                                                      request=GenerationRequest(params=params))
            return _answer(result, outcome.path, outcome.provider, outcome.summary(), attempts, started)
        attempts.append(f"prefix: {outcome.reason}")
    others = [p for p in peers if p.weights_hash != mine]
    with_fuser = [(p, exchange.find_fuser([p.weights_hash, p.name])) for p in others]
    for peer, fuser in [(p, f) for p, f in with_fuser if f] + [(p, None) for p, f in with_fuser if not f]:
        try:
            if fuser:
                result, info = await exchange.fused_generate(query, PeerID.from_base58(peer.peer_id), fuser, params,
                                                             private=private)
            else:
                result, info = await exchange.hint_generate(query, PeerID.from_base58(peer.peer_id), params,
                                                            private=private)
            return _answer(result, info.path, peer.peer_id, _info(info), attempts, started)
        except PrivacyRefused as exc:
            attempts.append(f"private: {exc}")
            break  # the rephrasing would be the same for every peer
        except (RpcError, TensorCodecError, PrefixRefused, FuserError, EngineError, ValueError, OSError) as exc:
            attempts.append(f"{'fused' if fuser else 'hint'} via {peer.peer_id[-6:]}: {type(exc).__name__}: {exc}")
            log.info("event=kv_ask_peer_failed peer=%s error=%r", peer.peer_id, exc)
    if not others:
        attempts.append("no peer of another model")
    request = GenerationRequest(params=params)
    if outcome is not None:
        result = await engine.generate_from_cache(outcome.tensors, outcome.metadata, request=request)
    else:
        result = await engine.generate(GenerationRequest(prompt_token_ids=ids, params=params))
    return _answer(result, PATH_LOCAL, None, {}, attempts, started)


def _info(info: ExchangeOutcome) -> dict[str, Any]:
    return asdict(info)


def _answer(result: Any, path: str, peer: str | None, details: dict[str, Any], attempts: list[str],
            started: float) -> KvAnswer:
    return KvAnswer(result.text, path, peer, result.to_dict(), details, attempts, time.perf_counter() - started)
