"""Running a load test: in this process, or in several spawned processes whose samples are pooled."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections.abc import Callable, MutableSequence
from typing import Any, TextIO

from costserve.client import Client
from costserve.loadtest.config import LoadStep, LoadtestConfig
from costserve.loadtest.generator import LoadGenerator, share
from costserve.loadtest.inputs import FileInputPool, InputPool, input_pool
from costserve.loadtest.protocols import ModelFacts, model_facts, protocol_notes
from costserve.loadtest.report import LoadReport, StepResult
from costserve.loadtest.samples import Samples

#: Several processes start a step together this long after the parent sends it, in seconds.
START_MARGIN_S = 0.2
#: How often the live progress line is redrawn, in seconds.
PROGRESS_INTERVAL_S = 0.5


class ProgressLine:
    """A live status line, redrawn in place on a terminal (``stream`` None: silent)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._last: tuple[float, int] = (0.0, 0)

    def show(self, step: LoadStep, index: int, total: int, elapsed_s: float, answered: int, failed: int) -> None:
        """Redraw: step, elapsed time, answered and failed requests, recent requests/s."""
        if self.stream is None:
            return
        last_time, last_answered = self._last
        rate = (answered - last_answered) / (elapsed_s - last_time) if elapsed_s > last_time else 0.0
        self._last = (elapsed_s, answered)
        self.stream.write(
            f"\r\033[K[{index + 1}/{total}] {step.label}: {elapsed_s:5.1f} s, {answered:,} ok, "
            f"{failed:,} failed, {rate:,.0f} req/s"
        )
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (the step's row is printed in the report)."""
        self._last = (0.0, 0)
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


async def _run_in_process(
    config: LoadtestConfig, pool: InputPool | FileInputPool, model: ModelFacts, progress: ProgressLine
) -> list[list[Samples]]:
    loop = asyncio.get_running_loop()
    generator = LoadGenerator(config, pool, model=model)
    await generator.connect()
    results = []
    try:
        steps = config.steps()
        for index, step in enumerate(steps):
            start = loop.time()
            running = asyncio.ensure_future(generator.run_step(share(step, config, 0, 1), start))
            while not running.done():
                await asyncio.wait([running], timeout=PROGRESS_INTERVAL_S)
                progress.show(step, index, len(steps), loop.time() - start, *generator.counters)
            progress.clear()
            results.append([running.result()])
    finally:
        await generator.close()
    return results


def _worker_main(
    connection: multiprocessing.connection.Connection,
    config: LoadtestConfig,
    pool: InputPool | FileInputPool,
    model: ModelFacts,
    worker: int,
    counters: MutableSequence[int],
) -> None:
    """A generator process: connect, say "ready", then run each step it is sent until told to stop."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        generator = LoadGenerator(config, pool, worker, config.processes, counters, model)
        await generator.connect()
        try:
            connection.send(("ready", None))
            while (message := await loop.run_in_executor(None, connection.recv))[0] == "step":
                step, start_wall = message[1]
                start = loop.time() + (start_wall - time.time())
                connection.send(("result", await generator.run_step(step, start)))
        finally:
            await generator.close()

    try:
        asyncio.run(serve())
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises LoadGeneratorFailed
        connection.send(("error", traceback.format_exc()))


class LoadGeneratorFailed(RuntimeError):
    """A load-generator process failed or exited; the message carries its traceback."""


def _collect(
    connections: list[multiprocessing.connection.Connection],
    kind: str,
    on_wait: Callable[[], None] | None = None,
) -> list[Any]:
    """One ``kind`` message from every worker, in worker order; raise if one failed or exited.

    ``on_wait`` runs between waits of at most PROGRESS_INTERVAL_S (it redraws the progress line).
    """
    received: dict[int, Any] = {}
    while len(received) < len(connections):
        waiting = [connection for index, connection in enumerate(connections) if index not in received]
        ready = multiprocessing.connection.wait(waiting, timeout=PROGRESS_INTERVAL_S)
        for index, connection in enumerate(connections):
            if index in received or connection not in ready:
                continue
            try:
                message_kind, payload = connection.recv()
            except EOFError:  # the process exited: its end of the pipe closed
                raise LoadGeneratorFailed(f"load-generator process {index} exited unexpectedly") from None
            if message_kind != kind:
                raise LoadGeneratorFailed(f"load-generator process {index} failed:\n{payload}")
            received[index] = payload
        if on_wait is not None:
            on_wait()
    return [received[index] for index in range(len(connections))]


def _run_in_processes(
    config: LoadtestConfig, pool: InputPool | FileInputPool, model: ModelFacts, progress: ProgressLine
) -> list[list[Samples]]:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited, TensorFlow-free
    processes: list[multiprocessing.process.BaseProcess] = []
    connections: list[multiprocessing.connection.Connection] = []
    counters = [context.RawArray("q", 2) for _ in range(config.processes)]
    stopped = False
    try:
        for worker in range(config.processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(child_end, config, pool, model, worker, counters[worker]),
                name=f"costserve-loadtest-{worker}",
                daemon=True,
            )
            process.start()
            child_end.close()
            processes.append(process)
            connections.append(parent_end)
        _collect(connections, "ready")
        results = []
        steps = config.steps()
        for index, step in enumerate(steps):
            start_wall = time.time() + START_MARGIN_S
            for worker, connection in enumerate(connections):
                counters[worker][0] = counters[worker][1] = 0
                connection.send(("step", (share(step, config, worker, config.processes), start_wall)))

            def show(step: LoadStep = step, index: int = index, start_wall: float = start_wall) -> None:
                answered = sum(counter[0] for counter in counters)
                failed = sum(counter[1] for counter in counters)
                progress.show(step, index, len(steps), max(time.time() - start_wall, 0.0), answered, failed)

            results.append(_collect(connections, "result", on_wait=show))
            progress.clear()
        for connection in connections:
            connection.send(("stop", None))
        stopped = True
        return results
    finally:
        for worker_process, connection in zip(processes, connections):
            if not stopped:  # something failed: the others need not finish their step
                worker_process.terminate()
            worker_process.join(timeout=10)
            connection.close()


def run_loadtest(config: LoadtestConfig, progress: TextIO | None = None) -> LoadReport:
    """Run every step of ``config`` against ``config.target``; ``progress`` gets a live status line.

    Raises ValueError on settings that cannot run (an ``--inputs`` folder without images, or a server
    that does not speak ``config.protocol``, included), ``grpc.RpcError`` when the server does not answer
    or does not serve the model (``NOT_FOUND``), and :class:`LoadGeneratorFailed` when a load-generator
    process fails.
    """
    config.validate()
    with Client(config.target, timeout=config.timeout_s, tls=config.tls, token=config.token) as client:
        info = client.model_info(config.model, config.model_version)
    if config.images_per_request > info.max_images_per_request:
        raise ValueError(
            f"--images-per-request {config.images_per_request} exceeds the server's limit of "
            f"{info.max_images_per_request} images per request"
        )
    facts = model_facts(config, info.input_shape, info.labels)
    height, width, _ = facts.input_shape
    pool = input_pool(config, height, width)
    model = f"{info.name} version {info.version}"
    notes = _label_notes(pool, list(info.labels), model) + protocol_notes(config)
    line = ProgressLine(progress)
    if config.processes == 1:
        parts = asyncio.run(_run_in_process(config, pool, facts, line))
    else:
        parts = _run_in_processes(config, pool, facts, line)
    steps = [
        StepResult(step, index, workers, config) for index, (step, workers) in enumerate(zip(config.steps(), parts))
    ]
    return LoadReport(
        target=config.target, model=model, config=config, steps=steps, inputs=pool.describe(), notes=notes
    )


def _label_notes(pool: InputPool | FileInputPool, labels: list[str], model: str) -> list[str]:
    """A warning when class folders are not among the model's labels: their images can never count as correct."""
    if not isinstance(pool, FileInputPool) or not labels:
        return []
    unknown = [name for name in pool.files.class_names if name not in labels]
    if not unknown:
        return []
    shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    return [
        f"{len(unknown)} class folder(s) are not labels of {model} ({shown}): accuracy compares each answer's "
        f"label_name with the folder name, so their images never count as correct; the model's labels are "
        f"{', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}"
    ]
