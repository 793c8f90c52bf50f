"""The costserve client library: sync and asyncio clients with a timeout on every call."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

#: An image: a path to a PNG/JPEG file, its bytes, or an array of pixels
#: (uint8 0..255 or float32 0..1, shape (h, w) or (h, w, c)).
ImageLike = str | Path | bytes | np.ndarray
#: gRPC metadata as it arrives: (key, value) pairs.
Metadata = Iterable[tuple[str, str | bytes]]

PRECISIONS = {"auto": pb.PRECISION_AUTO, "fp32": pb.PRECISION_FP32, "int8": pb.PRECISION_INT8}
PRECISION_NAMES = {value: name for name, value in PRECISIONS.items()}
#: Default per-call timeout, in seconds.
DEFAULT_TIMEOUT_S = 10.0
#: Largest message the client sends or accepts, in bytes (the server's default limit).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The two keys are also defined in costserve.server.servicer: the client never imports the server.
#: Request metadata key naming the tenant a call is charged to.
TENANT_METADATA_KEY = "x-costserve-tenant"
#: Request metadata key of the bearer token (``authorization: Bearer <token>``), gRPC's and HTTP's.
AUTHORIZATION_METADATA_KEY = "authorization"
#: Trailing metadata key holding a call's cost in USD (a stream's: the sum over its responses).
COST_METADATA_KEY = "x-costserve-cost-usd"


def image_message(image: ImageLike) -> pb.Image:
    """Build a costserve.v1 Image from a path, encoded bytes, or a pixel array."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        dtype = pb.DTYPE_UINT8
    elif np.issubdtype(array.dtype, np.floating):
        array, dtype = array.astype("<f4"), pb.DTYPE_FLOAT32
    else:
        raise TypeError(f"pixel arrays must be uint8 (0..255) or float (0..1), not {array.dtype}")
    return pb.Image(pixels=pb.Pixels(shape=list(array.shape), dtype=dtype, data=np.ascontiguousarray(array).tobytes()))


def precision_value(precision: str | int) -> pb.Precision:
    """``"auto"``/``"fp32"``/``"int8"`` (or the enum value) as the costserve.v1 Precision value."""
    if isinstance(precision, str):
        try:
            return PRECISIONS[precision.lower()]
        except KeyError:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}") from None
    return cast(pb.Precision, int(precision))  # an enum's values are ints at run time


def predict_request(
    images: Sequence[ImageLike],
    *,
    precision: str | int = "auto",
    skip_cache: bool = False,
    min_accuracy: float = 0.0,
    max_cost_usd: float = 0.0,
    model: str = "",
    version: str = "",
    top_k: int = 0,
) -> pb.PredictRequest:
    """The PredictRequest for ``images``; prepared once, it can be sent many times.

    ``precision``: ``"auto"`` (the server chooses), ``"fp32"`` or ``"int8"``.
    ``skip_cache``: compute even if the server has the answer cached (the cache is neither read nor filled).
    ``min_accuracy``: accuracy floor, 0..1 (0 = none); only a variant whose held-out accuracy reaches it may answer.
    ``max_cost_usd``: cost ceiling for the whole request, in USD (0 = none).
    A request the server cannot serve within these is refused with ``FAILED_PRECONDITION``.
    ``model``: the model to ask (see :meth:`Client.list_models`; ``""``: the server's default model).
    ``version``: its version (``""``: the latest it serves). An unknown one is refused with ``NOT_FOUND``.
    ``top_k``: return only the ``top_k`` most probable classes of each image, highest first, their class
    indices in ``Prediction.classes`` (0: every class's probability, in label order).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (every class) or more, not {top_k}")
    return pb.PredictRequest(
        images=[image_message(image) for image in images],
        precision=precision_value(precision),
        skip_cache=skip_cache,
        min_accuracy=min_accuracy,
        max_cost_usd=max_cost_usd,
        model_name=model,
        model_version=version,
        top_k=top_k,
    )


def version_state_name(state: int) -> str:
    """A ``VersionStatus.State`` as a short name: ``LOADING``, ``AVAILABLE``, ``UNLOADING``, ``FAILED``."""
    try:
        return pb.VersionStatus.State.Name(state).removeprefix("STATE_")
    except ValueError:  # a state added after this client was built
        return str(state)


def tenant_metadata(tenant: str | None) -> tuple[tuple[str, str], ...]:
    """The request metadata that charges a call to ``tenant`` (none for ``None`` or ``""``)."""
    return ((TENANT_METADATA_KEY, tenant),) if tenant else ()


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The request metadata that authenticates a call with ``token`` (none for ``None`` or ``""``).

    ``token`` is a bearer token: an API key (``csk_...``) or a JWT, sent as ``authorization: Bearer
    <token>``. It travels in plain text unless the channel uses TLS. Raises ValueError, without
    quoting the token, when it is not printable ASCII without spaces (what a metadata value can hold)::

        stub.ModelInfer(request, metadata=token_metadata(os.environ["COSTSERVE_TOKEN"]))
    """
    if not token:
        return ()
    # Checked here, once: gRPC would refuse it on every call, with an error that quotes the value.
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(
            f"the bearer token ({len(token)} characters) must be printable ASCII without spaces or line breaks"
        )
    return ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),)


def cost_usd(trailing_metadata: Metadata | None) -> float | None:
    """The call's cost in USD from its trailing metadata, or None when the server sent none.

    For a stream this is the sum over its responses. Sync: ``cost_usd(call.trailing_metadata())``;
    asyncio: ``cost_usd(await call.trailing_metadata())``.
    """
    for key, value in trailing_metadata or ():
        if key == COST_METADATA_KEY:
            return float(value.decode() if isinstance(value, bytes) else value)
    return None


class ResponseStream(Protocol):
    """What :meth:`Client.predict_stream` returns: an iterator of responses that is also the gRPC call."""

    def __iter__(self) -> Iterator[pb.PredictResponse]: ...

    def __next__(self) -> pb.PredictResponse: ...

    def trailing_metadata(self) -> Metadata | None:
        """The call's trailing metadata; blocks until the stream has ended."""

    def cancel(self) -> bool:
        """Cancel the stream."""


class _Defaults:
    """What both clients keep: the target, the default timeout and tenant, and the token's metadata."""

    def __init__(self, target: str, timeout: float, tenant: str | None, token: str | None) -> None:
        self.target = target
        self.timeout = timeout
        self.tenant = tenant
        # Only the metadata is kept, built once: the token itself is no attribute to print by mistake.
        self._auth_metadata = token_metadata(token)
        self._prebuilt_tenant = tenant
        self._prebuilt_metadata = tenant_metadata(tenant) + self._auth_metadata

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _metadata(self, tenant: str | None) -> tuple[tuple[str, str], ...]:
        """A prediction's metadata: its tenant's (default the client's) and the token's."""
        tenant = self.tenant if tenant is None else tenant
        if tenant == self._prebuilt_tenant:
            return self._prebuilt_metadata
        return tenant_metadata(tenant) + self._auth_metadata


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """How a client reaches a server whose gRPC port speaks TLS (``costserve-server --tls-cert``).

    ``ca``: PEM certificates of the CA that signed the server's certificate (None: the
    system's trusted roots). ``cert`` and ``key``: the client's own certificate and key,
    for a server that requires them (``--tls-client-ca``, mTLS).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def of(cls, ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> TlsFiles | None:
        """The files given (paths, or their text; empty or None: unset), None (plain text) when none is."""
        if not (ca or cert or key):
            return None
        return cls(*(Path(path) if path else None for path in (ca, cert, key)))

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate (--tls-cert, --tls-key)")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials of these files."""

        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def secure_or_plain_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), tls: TlsFiles | None = None
) -> grpc.Channel:
    """A channel to ``target``: TLS with ``tls``, plain text without."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=list(options))


def secure_or_plain_aio_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), tls: TlsFiles | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS with ``tls``, plain text without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=list(options))


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        *options,
    ]


class Client(_Defaults):
    """A costserve client over one gRPC channel; use it as a context manager.

    ``timeout`` is the default per-call timeout in seconds; every call can override
    it. ``tenant`` is the default tenant calls are charged to (request metadata
    ``x-costserve-tenant``); ``predict(..., tenant=...)`` overrides it per call.
    Errors raise ``grpc.RpcError`` with the server's status code and message
    (``NOT_FOUND`` for a model or version the server does not serve). ``tls``
    (:class:`TlsFiles`) connects with TLS, and mTLS when it holds a client certificate.

    ``token`` is a bearer token for a server that authenticates its callers: an API key
    (``csk_...``) or a JWT. Every call (health included) then carries the request metadata
    ``authorization: Bearer <token>``; a call with no valid token is refused with
    ``UNAUTHENTICATED``. The token travels in plain text, readable and replayable by anyone
    on the path, unless the channel uses TLS (``tls=TlsFiles(...)``). A token that cannot
    be metadata (spaces, line breaks, non-ASCII) raises ValueError here.

    Example::

        with Client("127.0.0.1:50051", timeout=5) as client:
            print(client.health())                      # "SERVING"
            print([model.name for model in client.list_models().models])
            info = client.model_info("digits")          # the latest version of model "digits"
            reply = client.predict([pixels], precision="fp32", tenant="acme")
            print(reply.model_name, reply.predictions[0].label, reply.cost.usd)
            reply = client.predict([pixels], model="digits", version="2", top_k=3)
            print(list(zip(reply.predictions[0].classes, reply.predictions[0].probabilities)))

        # A server that authenticates its callers, over TLS so that the token stays secret:
        token, ca = os.environ["COSTSERVE_TOKEN"], Path("ca.pem")
        with Client("10.0.0.5:50051", token=token, tls=TlsFiles(ca=ca)) as client:
            print(client.health())
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        tenant: str | None = None,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(target, timeout, tenant, token)
        self._channel = secure_or_plain_channel(target, _channel_options(options), tls)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def predict(
        self,
        images: Sequence[ImageLike],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> pb.PredictResponse:
        """Classify ``images`` in one request; one prediction per image, in order.

        The options are those of :func:`predict_request` (``model``, ``version`` and ``top_k``
        included); ``tenant`` (default the client's; ``""`` for none) is who the call is charged to.
        """
        return self.predict_with_call(
            images,
            precision=precision,
            skip_cache=skip_cache,
            tenant=tenant,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
            timeout=timeout,
        )[0]

    def predict_with_call(
        self,
        images: Sequence[ImageLike],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> tuple[pb.PredictResponse, grpc.Call]:
        """:meth:`predict`, also returning the finished gRPC call (its metadata, e.g. for :func:`cost_usd`)."""
        request = predict_request(
            images,
            precision=precision,
            skip_cache=skip_cache,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
        )
        return self._stub.Predict.with_call(request, timeout=self._timeout(timeout), metadata=self._metadata(tenant))

    def predict_stream(
        self,
        batches: Iterable[Sequence[ImageLike]],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> ResponseStream:
        """Send each element of ``batches`` as one request on a PredictStream; yield the answers in order.

        The options apply to every request; ``timeout`` bounds the whole stream. The
        result is also the call: once iterated, ``cost_usd(stream.trailing_metadata())``
        is the stream's total cost.
        """
        build = functools.partial(
            predict_request,
            precision=precision,
            skip_cache=skip_cache,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
        )
        requests = (build(images) for images in batches)
        return self._stub.PredictStream(requests, timeout=self._timeout(timeout), metadata=self._metadata(tenant))

    def model_info(self, model: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One served model version: input shape, preprocessing, labels, and each variant's accuracy and size.

        ``model`` ``""`` is the server's default model, ``version`` ``""`` its latest served version;
        an unknown one raises ``grpc.RpcError`` with ``NOT_FOUND``. ``Variant.accuracy`` and
        ``int8_agreement`` are optional fields: ``info.variants[0].HasField("accuracy")`` is False
        when the version was imported without held-out data.
        """
        request = pb.GetModelInfoRequest(model_name=model, model_version=version)
        return self._stub.GetModelInfo(request, timeout=self._timeout(timeout), metadata=self._auth_metadata)

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        """Every model of the server's repository, which one is the default, and each version's state.

        ``response.models[i]``: ``name``, ``is_default``, and ``versions`` (oldest first), each with
        ``version``, ``state`` (:func:`version_state_name` gives ``"AVAILABLE"``, ``"FAILED"``, ...)
        and ``reason`` (why it failed)::

            for model in client.list_models().models:
                print(model.name, [(v.version, version_state_name(v.state)) for v in model.versions])
        """
        return self._stub.ListModels(
            pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=self._auth_metadata
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status name: ``SERVING``, ``NOT_SERVING``, ...; raises on no answer."""
        reply = self._health.Check(  # type: ignore[attr-defined]  # typeshed's HealthStub omits Check
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._timeout(timeout),
            metadata=self._auth_metadata,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncClient(_Defaults):
    """The :class:`Client` on ``grpc.aio``: the same calls, awaited.

    Create it inside a coroutine (its channel belongs to the running event loop)
    and use it as an async context manager, or ``await client.close()``. ``tenant``,
    ``tls`` and ``token`` are the :class:`Client`'s: the bearer token goes with every
    call, in plain text unless ``tls`` is given.

    Example::

        import asyncio
        from costserve import AsyncClient, cost_usd

        paths = [f"examples/digits/digit_{digit}.png" for digit in range(10)]

        async def main() -> None:
            async with AsyncClient("127.0.0.1:50051", timeout=5, tenant="acme") as client:
                print(await client.health())                 # "SERVING"
                reply = await client.predict(paths[7:8], min_accuracy=0.95)
                print(reply.predictions[0].label, reply.cost.usd)
                replies = await asyncio.gather(*(client.predict([path]) for path in paths))  # concurrent calls
                print([r.predictions[0].label for r in replies])
                stream = client.predict_stream([[path] for path in paths], precision="int8")
                async for reply in stream:
                    print(reply.predictions[0].label)
                print(cost_usd(await stream.trailing_metadata()))   # the whole stream's cost

        asyncio.run(main())
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        tenant: str | None = None,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "create an AsyncClient inside a coroutine: its channel belongs to the running event loop"
            ) from None
        super().__init__(target, timeout, tenant, token)
        self._channel = secure_or_plain_aio_channel(target, _channel_options(options), tls)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls still running are cancelled)."""
        await self._channel.close()

    async def predict(
        self,
        images: Sequence[ImageLike],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> pb.PredictResponse:
        """Classify ``images`` in one request; as :meth:`Client.predict`."""
        response, _ = await self.predict_with_call(
            images,
            precision=precision,
            skip_cache=skip_cache,
            tenant=tenant,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
            timeout=timeout,
        )
        return response

    async def predict_with_call(
        self,
        images: Sequence[ImageLike],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> tuple[pb.PredictResponse, grpc.aio.UnaryUnaryCall]:
        """:meth:`predict`, also returning the finished call: ``cost_usd(await call.trailing_metadata())``."""
        request = predict_request(
            images,
            precision=precision,
            skip_cache=skip_cache,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
        )
        call = self._stub.Predict(request, timeout=self._timeout(timeout), metadata=self._metadata(tenant))
        return await call, call

    def predict_stream(
        self,
        batches: Iterable[Sequence[ImageLike]] | AsyncIterable[Sequence[ImageLike]],
        *,
        precision: str | int = "auto",
        skip_cache: bool = False,
        tenant: str | None = None,
        min_accuracy: float = 0.0,
        max_cost_usd: float = 0.0,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> grpc.aio.StreamStreamCall:
        """One PredictStream request per element of ``batches`` (an iterable or async iterable).

        ``async for`` the answers, as with :meth:`Client.predict_stream`; the returned call also gives
        ``cost_usd(await stream.trailing_metadata())``.
        """
        build = functools.partial(
            predict_request,
            precision=precision,
            skip_cache=skip_cache,
            min_accuracy=min_accuracy,
            max_cost_usd=max_cost_usd,
            model=model,
            version=version,
            top_k=top_k,
        )
        requests: Iterator[pb.PredictRequest] | AsyncIterator[pb.PredictRequest]
        if isinstance(batches, AsyncIterable):
            requests = (build(images) async for images in batches)
        else:
            requests = (build(images) for images in batches)
        return self._stub.PredictStream(requests, timeout=self._timeout(timeout), metadata=self._metadata(tenant))

    async def model_info(self, model: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One served model version, as :meth:`Client.model_info`."""
        request = pb.GetModelInfoRequest(model_name=model, model_version=version)
        return await self._stub.GetModelInfo(request, timeout=self._timeout(timeout), metadata=self._auth_metadata)

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        """The server's models and their versions' states, as :meth:`Client.list_models`."""
        return await self._stub.ListModels(
            pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=self._auth_metadata
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status name, as :meth:`Client.health`."""
        reply = await self._health.Check(  # type: ignore[attr-defined]  # typeshed's HealthStub omits Check
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._timeout(timeout),
            metadata=self._auth_metadata,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
