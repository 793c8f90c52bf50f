"""What gRPC itself counted for this server (channelz): the calls costserve never saw.

Under overload, gRPC core drops calls the event loop has not taken up yet (past
``--max-pending-calls``, as ``CANCELLED``), and calls whose deadline passes while they
wait end there. Neither reaches costserve's handlers, so ``costserve_requests_total``
cannot count them; gRPC's channelz counters can. costserve exports the calls gRPC
started, so that every call a client made is accounted for on the server: those less
the calls costserve answered or refused are the ones the transport ended on its own
(channelz counts those neither as succeeded nor as failed).

Example::

    before = server_ids()
    grpc_server = grpc.aio.server(...)
    calls = TransportCalls.of_new_server(before)
    started = calls.read()
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from grpc_channelz.v1 import channelz, channelz_pb2


class _Lookup:
    """The context channelz's lookups report a missing id to (they are written as servicer methods)."""

    def __init__(self) -> None:
        self.missing = False

    def set_code(self, code: Any) -> None:
        self.missing = True

    def set_details(self, details: str) -> None:
        """Ignored: a missing server reads as no calls."""

    def context(self) -> grpc.ServicerContext:
        """This object as the servicer context channelz's lookups are typed to take.

        They call only :meth:`set_code` and :meth:`set_details` of it.
        """
        return cast(grpc.ServicerContext, self)


def server_ids() -> set[int]:
    """The channelz ids of the gRPC servers of this process."""
    ids: set[int] = set()
    start = 0
    while True:
        page = channelz.ChannelzServicer.GetServers(
            channelz_pb2.GetServersRequest(start_server_id=start), _Lookup().context()
        )
        ids.update(server.ref.server_id for server in page.server)
        if page.end or not page.server:
            return ids
        start = max(ids) + 1


class TransportCalls:
    """gRPC's call counters of one server, read from channelz when asked (at scrape time)."""

    def __init__(self, server_id: int) -> None:
        self.server_id = server_id

    @classmethod
    def of_new_server(cls, before: set[int]) -> TransportCalls | None:
        """The counters of the one server created since ``before`` was listed; None when that is not one."""
        new = server_ids() - before
        return cls(new.pop()) if len(new) == 1 else None

    def read(self) -> int:
        """Calls gRPC received for this server so far (0 once it is gone)."""
        lookup = _Lookup()
        reply = channelz.ChannelzServicer.GetServer(
            channelz_pb2.GetServerRequest(server_id=self.server_id), lookup.context()
        )
        if lookup.missing or reply is None:
            return 0
        return reply.server.data.calls_started
