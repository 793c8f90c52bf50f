"""The gate every RPC passes before its handler: undecodable messages, the in-flight bound, the drain.

gRPC's own code would answer a message that is not valid protobuf with ``UNKNOWN``
(``INTERNAL`` on a stream) and log a traceback per call, and would let any number of
calls queue. Every service costserve serves is registered through :func:`guard_services`
instead, which wraps each method handler so that:

* a message that does not parse reaches the handler as :class:`Undecodable` and the
  call ends with ``INVALID_ARGUMENT``, counted, with no traceback;
* a request-specific parser can refuse a message from its wire bytes before it is
  parsed (see :func:`count_top_level_field`): a 16 MiB message of millions of empty
  images is refused in microseconds, not converted;
* a caller check (:mod:`~costserve.server.auth`: credentials, the tenant charged, who
  may read model information) runs first: its refusal ends the call, counted;
* calls to the gated services (the prediction API) are counted in flight; past
  ``max_in_flight`` a call gets ``RESOURCE_EXHAUSTED`` at once, and once the drain
  closes the gate, ``UNAVAILABLE``. Health and reflection are never gated: probes keep
  working under overload and while draining.

Example::

    gate = CallGate(max_in_flight=512, on_refused=count)
    collector = MethodCollector()
    classifier_pb2_grpc.add_ClassifierServicer_to_server(servicer, collector)
    guard_services(server, collector, gate, gated={"costserve.v1.Classifier"}, on_refused=count)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from typing import Any

import grpc

from costserve.server.errors import CostserveError, InvalidInput, Malformed, ServerBusy, Unavailable

#: Called with the service's full name, the method's short name (``Predict``) and the error a call was refused with.
RefusalCounter = Callable[[str, str, CostserveError], None]
#: Checks a call's caller from its context before its handler runs: raises the call's refusal
#: (a :class:`CostserveError`) or returns.
CallerCheck = Callable[[grpc.aio.ServicerContext], None]


class Undecodable:
    """What a tolerant deserializer returns in place of a message: the refusal it stands for."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


def tolerant(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """A deserializer that returns :class:`Undecodable` instead of raising on bad bytes."""

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as error:  # noqa: BLE001 - DecodeError, or RuntimeError for recursion too deep
            return Undecodable(
                Malformed(f"the message ({len(raw)} bytes) is not a valid {type_name}: {type(error).__name__}")
            )

    return deserialize


#: A request larger than this, in bytes, is looked at from its wire bytes before it is parsed
#: (see :func:`scanning_parser`); a smaller one parses in well under a millisecond whatever it holds.
SCAN_FROM_BYTES = 4096


def scanning_parser(message_type: Any, problem_of: Callable[[bytes], str]) -> Callable[[bytes], Any]:
    """A tolerant deserializer of ``message_type`` that first asks ``problem_of`` about a message over
    :data:`SCAN_FROM_BYTES`: a non-empty answer refuses it (:class:`Undecodable`) before it is parsed.

    A 16 MiB message can hold millions of empty submessages or strings; parsing it alone
    holds the event loop for most of a second. ``problem_of`` counts them from the wire
    bytes (:func:`count_top_level_field`, :func:`field_payloads`), at a bounded cost.
    """
    parse = tolerant(message_type.FromString, message_type.DESCRIPTOR.full_name)

    def parse_request(raw: bytes) -> Any:
        if len(raw) > SCAN_FROM_BYTES:
            problem = problem_of(raw)
            if problem:
                return Undecodable(InvalidInput(problem))
        return parse(raw)

    return parse_request


def _top_level_fields(raw: bytes | memoryview, most_fields: int) -> Iterator[tuple[int, int, int]]:
    """(field number, payload start, payload end) of each top-level field of wire bytes ``raw``, at most
    ``most_fields + 1`` of them; the payload of a varint or fixed-width field is its value's bytes.

    Walks tags and lengths without parsing anything. Malformed bytes end the walk early:
    the parser then says what is wrong.
    """
    position = seen = 0
    end = len(raw)
    while position < end and seen <= most_fields:
        tag, position = _varint(raw, position)
        wire_type = tag & 7
        start = position
        if wire_type == 0:
            _, position = _varint(raw, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 2:
            length, start = _varint(raw, position)
            position = start + length
        elif wire_type == 5:
            position += 4
        else:  # groups, or not protobuf: leave it to the parser
            return
        seen += 1
        yield tag >> 3, start, min(position, end)


def count_top_level_field(raw: bytes | memoryview, field_number: int, stop_after: int) -> int:
    """How many times ``field_number`` occurs at the top level of protobuf wire bytes ``raw``.

    Stops once the count passes ``stop_after`` or more than ``4 * stop_after + 64`` fields
    were seen (a valid request never repeats its scalar fields), so its cost is bounded
    whatever ``raw`` holds.
    """
    count = seen = 0
    most_fields = 4 * stop_after + 64
    for number, _, _ in _top_level_fields(raw, most_fields):
        seen += 1
        if number == field_number:
            count += 1
            if count > stop_after:
                break
    if seen > most_fields:
        return max(count, stop_after + 1)
    return count


def top_level_field_counts(raw: bytes | memoryview, most_fields: int) -> Counter[int] | None:
    """How many times each field number occurs at the top level of ``raw``; None when it has more than
    ``most_fields`` fields (the walk stops there)."""
    counts: Counter[int] = Counter()
    for seen, (number, _, _) in enumerate(_top_level_fields(raw, most_fields)):
        if seen == most_fields:
            return None
        counts[number] += 1
    return counts


def field_payloads(raw: bytes | memoryview, field_number: int, stop_after: int) -> list[memoryview]:
    """The payloads of a length-delimited ``field_number`` at the top level of ``raw`` (embedded messages),
    at most ``stop_after + 1`` of them: a bounded look inside a message before it is parsed."""
    view = memoryview(raw)
    payloads = []
    for number, start, end in _top_level_fields(view, 4 * stop_after + 64):
        if number == field_number:
            payloads.append(view[start:end])
            if len(payloads) > stop_after:
                break
    return payloads


def _varint(raw: bytes | memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    end = min(len(raw), position + 10)
    while position < end:
        byte = raw[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    return 0, len(raw)  # truncated: ends the walk


class CallGate:
    """Admission of prediction calls: the model loading, the server-wide in-flight bound and the drain.

    A plain context manager (``with gate.admit("costserve.v1.Classifier", "Predict"):``) entered at the start of a
    call's handler, so a call is counted exactly while its handler runs: the bound is
    checked and the count raised in one step of the event loop, and a flood of calls
    arriving together is refused beyond the bound rather than admitted as a whole.
    """

    def __init__(self, max_in_flight: int, on_refused: RefusalCounter | None = None, ready: bool = True) -> None:
        #: Most calls admitted at once; past it, calls get RESOURCE_EXHAUSTED.
        self.max_in_flight = max_in_flight
        #: False while the model loads (calls get UNAVAILABLE); the app opens the gate once it is warm.
        self.ready = ready
        #: False once the drain refuses new calls (they get UNAVAILABLE).
        self.accepting = True
        #: Calls being handled now.
        self.in_flight = 0
        self._on_refused = on_refused

    def admit(self, service: str, method: str) -> CallGate:
        """Admit a call to ``method`` of ``service`` or raise :class:`ServerBusy` / :class:`Unavailable` (counted)."""
        if not self.accepting:
            error: CostserveError = Unavailable(
                "the server is shutting down; retry on another replica or after it restarts"
            )
        elif not self.ready:
            error = Unavailable(
                "the model is still loading; retry shortly (the health service says when it is SERVING)"
            )
        elif self.in_flight >= self.max_in_flight:
            error = ServerBusy(
                f"the server has {self.in_flight} calls in flight, its limit (--max-concurrent-rpcs); "
                "retry with backoff"
            )
        else:
            return self
        if self._on_refused is not None:
            self._on_refused(service, method, error)
        raise error

    def __enter__(self) -> None:
        self.in_flight += 1

    def __exit__(self, *exc_info: object) -> None:
        self.in_flight -= 1


class MethodCollector:
    """Stands in for a server when generated ``add_*Servicer_to_server`` functions run: keeps their handlers."""

    def __init__(self) -> None:
        #: Method handlers by service name, then by method name.
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: generated code registers the same handlers through both calls."""

    def add_registered_method_handlers(self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        """Keep ``handlers`` of ``service_name``."""
        self.services.setdefault(service_name, {}).update(handlers)


async def abort_with(context: grpc.aio.ServicerContext, error: CostserveError) -> None:
    """End the call with ``error``'s status and message."""
    await context.abort(error.status, str(error))


def guard_services(
    server: grpc.aio.Server,
    collector: MethodCollector,
    gate: CallGate,
    gated: Collection[str],
    on_refused: RefusalCounter,
    parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
    checks: Mapping[str, CallerCheck] | None = None,
) -> None:
    """Register every collected service on ``server`` behind the gate.

    ``gated`` names the services (``"<service>"``) or single methods (``"<service>/<method>"``)
    whose calls count against the in-flight bound and the drain; ``parsers`` maps
    ``"<service>/<method>"`` to a request parser of its own (one that may return
    :class:`Undecodable` before parsing), used instead of the generated deserializer;
    ``checks`` maps a service or ``"<service>/<method>"`` (which wins) to its caller check.
    ``on_refused`` counts calls refused here: undecodable, or by a caller check.
    """
    parsers = parsers or {}
    checks = checks or {}
    for service, handlers in collector.services.items():
        guarded = {
            method: _guard(
                handler,
                service,
                method,
                gate if service in gated or f"{service}/{method}" in gated else None,
                on_refused,
                parsers.get(f"{service}/{method}"),
                checks.get(f"{service}/{method}") or checks.get(service),
            )
            for method, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)


def _guard(
    handler: grpc.RpcMethodHandler,
    service: str,
    method: str,
    gate: CallGate | None,
    on_refused: RefusalCounter,
    parser: Callable[[bytes], Any] | None,
    check: CallerCheck | None,
) -> grpc.RpcMethodHandler:
    generated = handler.request_deserializer
    if parser is None and generated is not None:
        parser = tolerant(generated, _type_name(generated))
    if handler.request_streaming:
        behaviour = handler.stream_unary or handler.stream_stream
    else:
        behaviour = handler.unary_unary or handler.unary_stream
    if behaviour is None:  # a handler carries the behaviour of its own kind: never the case
        raise ValueError(f"{method}: the handler has no behaviour of its streaming kind")
    wrapped = _wrap(behaviour, service, method, gate, on_refused, handler.request_streaming, check)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(wrapped, request_deserializer=parser, response_serializer=handler.response_serializer)


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # FromString is a classmethod of the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "message"


def _wrap(
    behaviour: Callable[..., Any],
    service: str,
    method: str,
    gate: CallGate | None,
    on_refused: RefusalCounter,
    request_streaming: bool,
    check: CallerCheck | None = None,
) -> Callable[..., Any]:
    """The handler behind the gate, of the same kind (coroutine or async generator) as ``behaviour``."""

    def admit(request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, CallGate | None]:
        """The request (a checked iterator for a stream) and the entered gate, or the call's refusal."""
        if check is not None:
            try:
                check(context)
            except CostserveError as error:
                on_refused(service, method, error)
                raise
        if request_streaming:
            request = _checked(request, service, method, on_refused)
        elif isinstance(request, Undecodable):
            on_refused(service, method, request.error)
            raise request.error
        return request, gate.admit(service, method) if gate is not None else None

    if inspect.isasyncgenfunction(behaviour):

        @functools.wraps(behaviour)
        async def stream_handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                request, entered = admit(request, context)
                with entered or contextlib.nullcontext():
                    async for response in behaviour(request, context):
                        yield response
            except CostserveError as error:
                await abort_with(context, error)

        return stream_handler

    @functools.wraps(behaviour)
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            request, entered = admit(request, context)
            with entered or contextlib.nullcontext():
                return await behaviour(request, context)
        except CostserveError as error:
            await abort_with(context, error)

    return handler


async def _checked(
    requests: AsyncIterator[Any], service: str, method: str, on_refused: RefusalCounter
) -> AsyncIterator[Any]:
    """The messages of a request stream; an undecodable one raises its refusal, in order."""
    async for message in requests:
        if isinstance(message, Undecodable):
            on_refused(service, method, message.error)
            raise message.error
        yield message
