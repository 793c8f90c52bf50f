"""The ceiling: the fastest a one-process Python gRPC server can answer ``Predict`` and ``ModelInfer``.

A minimal ``grpc.aio`` server answering costserve.v1's ``costserve.v1.Classifier/Predict``
and the Open Inference Protocol's ``inference.GRPCInferenceService/ModelInfer``, each
with one prebuilt response: by default one shaped like costserve's answer for one image
(every field set, ten probabilities); the benchmark passes ``--response-file`` and
``--v2-response-file`` with the bytes of real costserve answers so the two send the
same sizes. Each call's request is parsed and its response serialized, as for any
generated servicer. No model, no cache, no metrics: what is left is gRPC, HTTP/2 and
protobuf in one Python process, which is the most costserve could ever do with the
same client on the same machine, through either protocol.

::

    python -m benchmarks.ceiling [--port 0] [--response-file answer.bin] [--v2-response-file answer-v2.bin]
                                 [--ready-file ready.json] [--processes N]
    # prints "ceiling listening on 127.0.0.1:PORT"

It listens on 127.0.0.1 only and exits on SIGTERM or SIGINT. Like costserve's server,
``--ready-file`` announces the bound port to a launcher as JSON (``pid``, ``host``,
``port``, ``metrics_port`` 0, ``serving`` true), written whole then renamed into place,
and removed on the way out.

``--processes N`` (N > 1) is the ceiling of ``costserve-server serve --workers N``: this
process reserves the port as costserve's supervisor does (a bound, never listening
``SO_REUSEPORT`` socket), starts N ceilings on it, each its own process binding it with
``grpc.so_reuseport=1``, serves nothing itself, and passes SIGTERM or SIGINT on to them.
Its ready file is written once all N listen and lists them as the supervisor's does:
``workers``, each with its ``index``, ``pid`` and ``metrics_port`` 0. The kernel spreads
connections, not calls, over the N processes, so a client needs several connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from costserve.protocols import inference_pb2 as v2
from costserve.v1 import classifier_pb2 as pb

#: Channel arguments: the same as costserve's server (see costserve.server.app.grpc_options); with
#: ``--processes`` each process binds with ``grpc.so_reuseport`` 1 instead, as costserve's workers do.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


#: The probabilities of the built-in answers: one image, ten classes, class 7 on top.
PROBABILITIES = [0.0012, 0.0031, 0.0007, 0.0104, 0.0009, 0.0048, 0.0002, 0.9712, 0.0021, 0.0054]


def fixed_response() -> pb.PredictResponse:
    """A PredictResponse shaped like costserve's answer for one image, every field non-default."""
    probabilities = PROBABILITIES
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


def fixed_infer_response() -> v2.ModelInferResponse:
    """A ModelInferResponse shaped like costserve's v2 answer for one raw image: its three outputs, raw, and the
    ``cost_usd``, ``precision``, ``cache_hits`` and ``decision_reason`` parameters."""
    response = v2.ModelInferResponse(model_name="digits", model_version="1")
    for name, datatype, shape in (
        ("probabilities", "FP32", [1, 10]),
        ("labels", "BYTES", [1]),
        ("classes", "INT64", [1]),
    ):
        response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.extend(
        [np.asarray(PROBABILITIES, "<f4").tobytes(), b"\x01\x00\x00\x007", np.asarray([7], "<i8").tobytes()]
    )
    parameters = response.parameters
    parameters["cost_usd"].double_param = 1.234567e-8
    parameters["precision"].string_param = "fp32"
    parameters["cache_hits"].int64_param = 0
    parameters["decision_reason"].string_param = "requested"
    return response


#: What the ceiling answers: (service, method, the request's message class) and the default answer of each.
METHODS: tuple[tuple[str, str, type[Message]], ...] = (
    ("costserve.v1.Classifier", "Predict", pb.PredictRequest),
    ("inference.GRPCInferenceService", "ModelInfer", v2.ModelInferRequest),
)


def add_fixed_answer(
    server: grpc.aio.Server, service: str, method: str, request_type: type[Message], response: Message
) -> None:
    """Answer ``service``/``method`` with ``response``, registered as generated servicers register theirs."""

    async def answer(request: Message, context: grpc.aio.ServicerContext) -> Message:
        return response

    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=request_type.FromString, response_serializer=type(response).SerializeToString
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def write_ready_file(path: Path, port: int, workers: list[int] | None = None) -> None:
    """Announce the bound port as costserve's server does (``--ready-file``): written whole, then renamed.

    ``workers``: the pids of the processes serving the port for this one (``--processes``), listed as
    costserve's supervisor lists its workers.
    """
    ready: dict[str, Any] = {"pid": os.getpid(), "host": "127.0.0.1", "port": port, "metrics_port": 0, "serving": True}
    if workers is not None:
        ready["workers"] = [{"index": index, "pid": pid, "metrics_port": 0} for index, pid in enumerate(workers)]
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ready) + "\n")
    os.replace(partial, path)


async def serve(
    port: int,
    response: pb.PredictResponse | None = None,
    ready_file: Path | None = None,
    infer_response: v2.ModelInferResponse | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve on 127.0.0.1:``port`` (0 = any free port) until SIGTERM or SIGINT; announce it in ``ready_file``.

    ``Predict`` answers ``response`` and ``ModelInfer`` ``infer_response`` (default: the built-in ones).
    ``reuse_port`` binds with ``SO_REUSEPORT``, beside the other processes of ``--processes``.
    """
    options = [(name, int(reuse_port) if name == "grpc.so_reuseport" else value) for name, value in GRPC_OPTIONS]
    server = grpc.aio.server(options=options)
    answers = (response or fixed_response(), infer_response or fixed_infer_response())
    for (service, method, request_type), answer in zip(METHODS, answers):
        add_fixed_answer(server, service, method, request_type, answer)
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


def serve_processes(processes: int, port: int, ready_file: Path | None, answer_args: list[str]) -> int:
    """Run ``processes`` ceilings on one 127.0.0.1 port until SIGTERM or SIGINT; the exit status.

    ``answer_args`` (``--response-file``, ``--v2-response-file``) are passed on to each. Returns 1
    when one of them exits on its own or does not listen within 60 s, 0 after a clean stop.
    """
    from costserve.server.supervisor import reserve_port

    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reserved = reserve_port("127.0.0.1", port)
    bound = reserved.getsockname()[1]
    scratch = Path(tempfile.mkdtemp(prefix="ceiling-processes-"))
    ready_files = [scratch / f"ceiling-{index}.json" for index in range(processes)]
    command = [sys.executable, "-m", "benchmarks.ceiling", "--port", str(bound), "--reuse-port", *answer_args]
    children = [subprocess.Popen([*command, "--ready-file", str(child_ready)]) for child_ready in ready_files]
    status = 0
    try:
        listening_by = time.monotonic() + 60
        while not all(path.exists() for path in ready_files):
            if stop or time.monotonic() > listening_by or any(child.poll() is not None for child in children):
                return 1
            time.sleep(0.02)
        print(f"ceiling: {processes} processes listening on 127.0.0.1:{bound}", flush=True)
        if ready_file is not None:
            write_ready_file(ready_file, bound, [child.pid for child in children])
        while not stop:
            if any(child.poll() is not None for child in children):
                status = 1
                break
            time.sleep(0.1)
        return status
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        reserved.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.ceiling [--port N]``."""
    parser = argparse.ArgumentParser(
        description="Minimal grpc.aio Classifier/Predict and GRPCInferenceService/ModelInfer with fixed responses."
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument(
        "--response-file",
        type=Path,
        default=None,
        help="a serialized PredictResponse to answer with (default: built in)",
    )
    parser.add_argument(
        "--v2-response-file",
        type=Path,
        default=None,
        help="a serialized ModelInferResponse to answer ModelInfer with (default: built in)",
    )
    parser.add_argument("--ready-file", type=Path, help="write the bound port here as JSON once listening")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="serving processes on the one port, with SO_REUSEPORT, as costserve-server serve --workers N (default 1: "
        "this process serves)",
    )
    parser.add_argument(
        "--reuse-port", action="store_true", help="bind with SO_REUSEPORT (what each process of --processes does)"
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.processes > 1:
        answer_args = []
        for flag, path in (("--response-file", args.response_file), ("--v2-response-file", args.v2_response_file)):
            answer_args += [flag, str(path)] if path is not None else []
        return serve_processes(args.processes, args.port, args.ready_file, answer_args)
    response = pb.PredictResponse.FromString(args.response_file.read_bytes()) if args.response_file else None
    infer_response = (
        v2.ModelInferResponse.FromString(args.v2_response_file.read_bytes()) if args.v2_response_file else None
    )
    asyncio.run(serve(args.port, response, args.ready_file, infer_response, args.reuse_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
