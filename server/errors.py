"""Errors the service raises, each carrying the gRPC status it maps to.

The core raises these; the servicer turns them into ``context.abort(status, message)``
in one place (:func:`costserve.server.servicer.abort_on_error`). Anything else that
escapes is a bug and becomes ``INTERNAL``.
"""

from __future__ import annotations

import grpc


class CostserveError(Exception):
    """Base class: a failure with a status code and a message a person can act on."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: The ``reason`` label of ``costserve_rejected_total`` it counts under; "" counts none.
    reason: str = ""


class InvalidInput(CostserveError):
    """The request itself is wrong (shape, encoding, values, counts)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_input"


class Malformed(InvalidInput):
    """The message is not a valid protobuf of the method's request type."""

    reason = "malformed"


class Overloaded(CostserveError):
    """A bounded resource is full (the batch queue); retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "queue_full"


class DecodeQueueFull(Overloaded):
    """Every image-decoding thread is busy and ``--max-decode-queue`` requests already wait for one."""

    reason = "decode_queue_full"


class ServerBusy(Overloaded):
    """The server already has ``--max-concurrent-rpcs`` calls in flight."""

    reason = "server_busy"


class OverObjective(Overloaded):
    """An AUTO request no variant is predicted to answer within the latency objective (``--over-slo refuse``)."""

    reason = "over_objective"


class BudgetExceeded(CostserveError):
    """The tenant has spent its budget for the current period; retry after it resets."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "budget"


class ConstraintUnmet(CostserveError):
    """No variant the request allows can meet its accuracy floor or cost ceiling.

    FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is well formed, but the
    served variants (their accuracy) or the current prices cannot satisfy it.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "constraint"


class NotFound(CostserveError):
    """The request names a model or version the server does not serve; the message names those it does."""

    status = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class DeadlineExceeded(CostserveError):
    """The request's deadline passed before it could be computed."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class Unavailable(CostserveError):
    """The service cannot take requests now (starting, or draining for shutdown)."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class InferenceFailed(CostserveError):
    """The runtime failed on a batch; every request in that batch gets this."""

    status = grpc.StatusCode.INTERNAL


class Unauthenticated(CostserveError):
    """The call carries no credentials, or ones that are not valid (unknown, revoked, expired, badly signed)."""

    status = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class PermissionDenied(CostserveError):
    """The caller is authenticated but may not do this: charge another tenant, or call a method turned off."""

    status = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class StartupError(Exception):
    """The server cannot start as configured, e.g. its port is taken: the message says why and what to change.

    Not a :class:`CostserveError`: no call is answered with it. ``costserve-server`` prints it
    on one line and exits with status 2.
    """
