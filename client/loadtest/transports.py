"""How requests travel: one unary call each (``Predict``, ``ModelInfer``, ...), or pipelined on a
costserve.v1 ``PredictStream`` call. Each answer comes back read by the protocol's codec."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import grpc

from costserve.loadtest.protocols import Codec, Reply
from costserve.v1 import classifier_pb2 as pb

PREDICT_STREAM_METHOD = "/costserve.v1.Classifier/PredictStream"


class UnaryTransport:
    """Unary calls of ``codec``'s method on one channel, each with its own deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, codec: Codec) -> None:
        self._call: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            codec.method, response_deserializer=codec.response_type.FromString
        )
        self._timeout_s = timeout_s
        self._codec = codec

    async def predict(self, payload: bytes) -> Reply:
        """Send one serialized request; raise ``grpc.aio.AioRpcError`` on failure."""
        metadata = self._codec.metadata or None
        if not self._codec.cost_in_trailers:
            return self._codec.reply(await self._call(payload, timeout=self._timeout_s, metadata=metadata), None)
        call = self._call(payload, timeout=self._timeout_s, metadata=metadata)
        response = await call
        return self._codec.reply(response, await call.trailing_metadata())

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
    """costserve.v1 requests pipelined on one ``PredictStream`` call; answers (in order) are matched to their
    requests and read by ``codec`` (a :class:`~costserve.loadtest.protocols.V1Codec`).

    When the server ends the stream with an error, every request still waiting on it fails with
    that status, and the next request opens a new stream.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, codec: Codec) -> None:
        self._method: grpc.aio.StreamStreamMultiCallable = channel.stream_stream(
            PREDICT_STREAM_METHOD, response_deserializer=pb.PredictResponse.FromString
        )
        self._timeout_s = timeout_s
        self._codec = codec
        self._stream: _OpenStream | None = None
        self._write_lock = asyncio.Lock()

    async def predict(self, payload: bytes) -> Reply:
        """Send one serialized PredictRequest on the stream and wait for its answer."""
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if self._stream is None or self._stream.finished:
                self._stream = _OpenStream(self._method(timeout=self._timeout_s, metadata=self._codec.metadata or None))
                self._stream.reader = asyncio.ensure_future(self._read(self._stream))
            stream = self._stream
            # Queued before writing: the reader resolves it, even if the stream fails during the write.
            stream.pending.append(answer)
            try:
                await stream.call.write(payload)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream ended; its reader fails every pending answer with the stream's status
        return self._codec.reply(await answer, None)

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
