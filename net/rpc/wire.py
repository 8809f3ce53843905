"""The thin trio layer that moves frames over one libp2p stream."""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

from knexa.net.rpc.errors import CodecError, ErrorCode, RpcError
from knexa.net.rpc.frames import Frame, FrameDecoder, decode_payload, encode_frame
from knexa.net.rpc.metrics import RpcMetrics
from knexa.net.rpc.yamux_tuning import widen_receive_window

READ_SIZE = 16 * 1024 * 1024  # read whatever the muxer has buffered, in one call
WRITE_TIMEOUT = 30.0
# py-libp2p's yamux cuts writes into frames of up to 64 KiB + 12 bytes of header,
# and Noise carries at most 65519 plaintext bytes per message, so a full yamux
# frame costs two Noise messages (65519 + 17 bytes), i.e. two encryptions, two
# socket writes and four exact reads on the other side. Writing pieces that fit
# one Noise message with their yamux header halves that work.
WRITE_PIECE = 65519 - 12


class TruncatedFrame(CodecError):
    """The stream ended in the middle of a frame."""


class FramedStream:
    """Serialised frame writes and buffered frame reads on one stream.

    Writes are serialised by a FIFO lock: yamux splits a large write into
    64 KiB frames and two unserialised writers could interleave them.
    """

    def __init__(self, stream: INetStream, max_frame_size: int, metrics: RpcMetrics) -> None:
        self.stream = stream
        # Read and write the muxed stream directly: NetStream adds a state lock
        # acquisition to every call and nothing this layer needs (it catches
        # every stream error itself).
        self._io = getattr(stream, "muxed_stream", stream)
        self.peer_id = stream.muxed_conn.peer_id
        self.peer_bytes = self.peer_id.to_bytes()
        self._decoder = FrameDecoder(max_frame_size)
        self._write_lock = trio.Lock()
        self._metrics = metrics
        self.closed = False

    async def start(self) -> None:
        """Prepare the stream for RPC traffic (see `yamux_tuning`)."""
        async with self._write_lock:
            with trio.move_on_after(WRITE_TIMEOUT) as scope:
                scope.shield = True
                await widen_receive_window(self._io)

    async def send_raw(self, data: bytes) -> None:
        """Write `data` whole, or fail the stream.

        A write is shielded from cancellation once it starts: a frame cut in
        half by a cancelled caller would corrupt the framing for every other
        call on the stream (and the yamux/Noise layers below are not cancel-safe
        mid-write either). A write that makes no progress for `WRITE_TIMEOUT`
        resets the stream instead.
        """
        async with self._write_lock:
            if self.closed:
                raise trio.ClosedResourceError("RPC stream is closed")
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                try:
                    if len(data) <= WRITE_PIECE:
                        await self._io.write(data)
                    else:
                        view = memoryview(data)
                        for start in range(0, len(data), WRITE_PIECE):
                            await self._io.write(view[start : start + WRITE_PIECE])
                except BaseException:
                    self.closed = True
                    raise
            if scope.cancelled_caught:
                await self.reset()
                raise trio.BrokenResourceError("RPC stream write timed out")
        self._metrics.bytes_out += len(data)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def send(self, frame: Frame) -> int:
        """Write one frame; returns its payload size (what flow control counts)."""
        data = encode_frame(frame)
        if len(data) - 4 > self._decoder.max_frame_size:
            # Never send what a peer with our limits would drop the stream for.
            raise RpcError(ErrorCode.MESSAGE_TOO_LARGE,
                           f"message of {len(data) - 4} bytes exceeds the limit of "
                           f"{self._decoder.max_frame_size}")
        await self.send_raw(data)
        return len(data) - 4

    async def receive(self) -> tuple[Frame, int] | None:
        """The next frame and its payload size; None on a clean end of stream.

        Raises `FrameTooLarge` (from the length prefix alone), `CodecError` for
        a malformed payload and `TruncatedFrame` when the stream ends mid-frame.
        """
        dec = self._decoder
        while True:
            payload = dec.next_payload()
            if payload is not None:
                return decode_payload(payload), len(payload)
            try:
                data = await self._io.read(max(READ_SIZE, dec.needed()))
            except Exception:  # EOF and reset surface as a zoo of stream exceptions
                data = b""
            if not data:
                if dec.buffered:
                    raise TruncatedFrame(f"stream ended inside a frame ({dec.buffered} bytes)")
                return None
            self._metrics.bytes_in += len(data)
            dec.feed(data)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.close()
            except Exception:
                pass

    async def reset(self) -> None:
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.reset()
            except Exception:
                pass
