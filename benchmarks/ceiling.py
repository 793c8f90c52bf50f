"""The ceiling: the fastest a one-process Python gRPC server can answer ``Predict``.

A minimal ``grpc.aio`` server implementing ``costserve.v1.Classifier.Predict`` that
answers every request with one prebuilt ``PredictResponse``: by default one shaped
like costserve's answer for one image (every field set, ten probabilities); the
benchmark passes ``--response-file`` with the bytes of a real costserve answer so the
two send the same size. No model, no cache, no metrics: what is left is gRPC, HTTP/2
and protobuf in one Python process, which is the most costserve could ever do with
the same client on the same machine.

::

    python -m benchmarks.ceiling [--port 0] [--response-file answer.bin] [--ready-file ready.json]
    # prints "ceiling listening on 127.0.0.1:PORT"

It listens on 127.0.0.1 only and exits on SIGTERM or SIGINT. Like costserve's server,
``--ready-file`` announces the bound port to a launcher as JSON (``pid``, ``host``,
``port``, ``metrics_port`` 0, ``serving`` true), written whole then renamed into place,
and removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc

from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

#: Channel arguments: the same as costserve's server (see costserve.server.app.grpc_options).
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def fixed_response() -> pb.PredictResponse:
    """A PredictResponse shaped like costserve's answer for one image, every field non-default."""
    probabilities = [0.0012, 0.0031, 0.0007, 0.0104, 0.0009, 0.0048, 0.0002, 0.9712, 0.0021, 0.0054]
    return pb.PredictResponse(
        predictions=[
            pb.Prediction(
                label=7,
                score=probabilities[7],
                probabilities=probabilities,
                cache_hit=False,
                precision=pb.PRECISION_FP32,
                batch_size=32,
                label_name="7",
            )
        ],
        model_version="1",
        server_seconds=0.0123456789,
        cost=pb.Cost(
            usd=1.234567e-8,
            cpu_usd=1.034567e-8,
            memory_usd=1.5e-9,
            network_usd=5.0e-10,
            cpu_seconds=0.000345678,
            memory_gb_seconds=1.2345e-6,
            network_bytes=1234,
            utilization=0.87654321,
        ),
    )


class CeilingServicer(pb_grpc.ClassifierServicer):
    """Answers every Predict with the same prebuilt response."""

    def __init__(self, response: pb.PredictResponse) -> None:
        self.response = response

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return self.response


def write_ready_file(path: Path, port: int) -> None:
    """Announce the bound port as costserve's server does (``--ready-file``): written whole, then renamed."""
    ready = {"pid": os.getpid(), "host": "127.0.0.1", "port": port, "metrics_port": 0, "serving": True}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ready) + "\n")
    os.replace(partial, path)


async def serve(port: int, response: pb.PredictResponse | None = None, ready_file: Path | None = None) -> None:
    """Serve on 127.0.0.1:``port`` (0 = any free port) until SIGTERM or SIGINT; announce it in ``ready_file``."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_ClassifierServicer_to_server(CeilingServicer(response or fixed_response()), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    print(f"ceiling listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready_file is not None:
        write_ready_file(ready_file, bound)
    await stop.wait()
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.ceiling [--port N]``."""
    parser = argparse.ArgumentParser(description="Minimal grpc.aio Classifier.Predict with a fixed response.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument(
        "--response-file",
        type=Path,
        default=None,
        help="a serialized PredictResponse to answer with (default: built in)",
    )
    parser.add_argument("--ready-file", type=Path, help="write the bound port here as JSON once listening")
    args = parser.parse_args(argv)
    response = pb.PredictResponse.FromString(args.response_file.read_bytes()) if args.response_file else None
    asyncio.run(serve(args.port, response, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
