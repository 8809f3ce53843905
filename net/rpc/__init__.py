"""Signed RPC over libp2p streams: unary and streaming calls, tensors on the wire."""

from knexa.net.rpc.client import RequestSink, ResponseStream
from knexa.net.rpc.config import PROTOCOL_ID, RpcConfig
from knexa.net.rpc.envelope import Envelope, Kind, sign_payload, verify_detached
from knexa.net.rpc.errors import CodecError, ErrorCode, RpcError
from knexa.net.rpc.metrics import RpcMetrics
from knexa.net.rpc.registry import CallKind
from knexa.net.rpc.server import CallContext, RequestStream
from knexa.net.rpc.service import RpcService
from knexa.net.rpc.tensor_stream import (
    TensorStreamError,
    iter_tensor_events,
    receive_tensors,
    send_tensor_stream,
    send_tensors,
)
from knexa.net.rpc.tensors import TensorCodecError, TensorSpec, decode_tensors, encode_tensors

__all__ = [
    "PROTOCOL_ID",
    "CallContext",
    "CallKind",
    "CodecError",
    "Envelope",
    "ErrorCode",
    "Kind",
    "RequestSink",
    "RequestStream",
    "ResponseStream",
    "RpcConfig",
    "RpcError",
    "RpcMetrics",
    "RpcService",
    "TensorCodecError",
    "TensorSpec",
    "TensorStreamError",
    "decode_tensors",
    "encode_tensors",
    "iter_tensor_events",
    "receive_tensors",
    "send_tensor_stream",
    "send_tensors",
    "sign_payload",
    "verify_detached",
]
