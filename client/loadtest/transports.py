"""How requests travel: one ``Predict`` call each, or pipelined on a ``PredictStream`` call."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import grpc

from costserve.v1 import classifier_pb2 as pb

PREDICT_METHOD = "/costserve.v1.Classifier/Predict"
PREDICT_STREAM_METHOD = "/costserve.v1.Classifier/PredictStream"


class UnaryTransport:
    """``Predict`` calls on one channel, each with its own deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._call: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            PREDICT_METHOD, response_deserializer=pb.PredictResponse.FromString
        )
        self._timeout_s = timeout_s

    async def predict(self, payload: bytes) -> pb.PredictResponse:
        """Send one serialized PredictRequest; raise ``grpc.aio.AioRpcError`` on failure."""
        return await self._call(payload, timeout=self._timeout_s)

    async def close(self) -> None:
        """Nothing to close: each call ends by itself."""


@dataclass
class _OpenStream:
    call: grpc.aio.StreamStreamCall
    #: Futures of the requests written and not yet answered, in order.
    pending: deque = field(default_factory=deque)
    finished: bool = False
    reader: asyncio.Task | None = None


class StreamTransport:
    """Requests pipelined on one ``PredictStream`` call; answers (in order) are matched to their requests.

    When the server ends the stream with an error, every request still waiting on it fails with
    that status, and the next request opens a new stream.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method: grpc.aio.StreamStreamMultiCallable = channel.stream_stream(
            PREDICT_STREAM_METHOD, response_deserializer=pb.PredictResponse.FromString
        )
        self._timeout_s = timeout_s
        self._stream: _OpenStream | None = None
        self._write_lock = asyncio.Lock()

    async def predict(self, payload: bytes) -> pb.PredictResponse:
        """Send one serialized PredictRequest on the stream and wait for its answer."""
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if self._stream is None or self._stream.finished:
                self._stream = _OpenStream(self._method(timeout=self._timeout_s))
                self._stream.reader = asyncio.ensure_future(self._read(self._stream))
            stream = self._stream
            # Queued before writing: the reader resolves it, even if the stream fails during the write.
            stream.pending.append(answer)
            try:
                await stream.call.write(payload)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream ended; its reader fails every pending answer with the stream's status
        return await answer

    async def close(self) -> None:
        """Half-close the stream and wait until every answer arrived."""
        async with self._write_lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        if not stream.finished:
            try:
                await stream.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # already ended; the reader saw why
        assert stream.reader is not None
        await stream.reader

    @staticmethod
    async def _read(stream: _OpenStream) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while (response := await stream.call.read()) is not grpc.aio.EOF:
                stream.pending.popleft().set_result(response)
        except grpc.aio.AioRpcError as failure:
            error = failure
        stream.finished = True
        if stream.pending and error is None:
            error = grpc.aio.AioRpcError(
                grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "the stream ended before answering"
            )
        while stream.pending:
            stream.pending.popleft().set_exception(error)
