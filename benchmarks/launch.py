"""Start and stop server processes for tests and benchmarks: costserve, and the ceiling.

Every server runs as a subprocess on 127.0.0.1 and port 0 with ``--ready-file``: it writes
that JSON file (``pid``, ``host``, ``port``, ``metrics_port``, ``serving``) once its ports
are bound, and again once it is SERVING; the launcher reads the ports from it, never from
the log. The log (stdout and stderr) goes to a file beside it.

Example::

    from benchmarks.launch import start_costserve

    with start_costserve(model_dir, "--max-batch-size", "1", metrics=True, serving=True) as server:
        print(server.target, server.metrics_url)

    with start_costserve(None, repository=repository_dir, serving=True) as server:  # --model-repository
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path(os.environ.get("COSTSERVE_MODEL_DIR", REPO_ROOT / "models" / "digits"))
#: Flags every benchmark server gets beyond its own: a short drain when stopped.
BENCHMARK_FLAGS = ("--drain-seconds", "2")
#: How often the ready file is looked for, in seconds.
POLL_S = 0.05


class ServerFailed(RuntimeError):
    """A server process exited, or did not get ready in time; the message ends with its log's tail."""


class ServerProcess:
    """A server subprocess on 127.0.0.1 that announces its ports in a ready file.

    ``port`` and ``metrics_port`` (0 when /metrics is off) are known once :meth:`wait_bound`
    returned; the launchers below call it. Stop it with :meth:`stop` (SIGTERM, then SIGKILL)
    or :meth:`kill`; as a context manager it stops on exit. With ``ready_file=False`` (a server
    from before ``--ready-file``) the command gets no such flag: the caller sets ``port``.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_file: bool = True,
    ) -> None:
        self.name = name
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-")) if workdir is None else workdir
        self.ready_file = self.workdir / f"{name}.ready.json"
        self.log_path = self.workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        self.port = 0
        self.metrics_port = 0
        self._final_log: str | None = None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, *(("--ready-file", str(self.ready_file)) if ready_file else ())],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env={**server_env(), **(env or {})},
            )

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC port."""
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The server's /metrics URL."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    @property
    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log.splitlines()[-lines:])

    def ready(self) -> dict[str, Any] | None:
        """The ready file's contents, or None while there is none (not bound yet, or draining)."""
        try:
            return json.loads(self.ready_file.read_text())
        except FileNotFoundError:
            return None

    def wait_bound(self, timeout_s: float = 300) -> dict[str, Any]:
        """Wait for the ready file; read the ports from it and return it. Raises :class:`ServerFailed`."""
        ready = self._wait(lambda ready: True, "bound its ports", timeout_s)
        self.port, self.metrics_port = int(ready["port"]), int(ready["metrics_port"])
        return ready

    def wait_serving(self, timeout_s: float = 300) -> None:
        """Wait until the ready file says SERVING (model loaded and warm). Raises :class:`ServerFailed`."""
        self._wait(lambda ready: bool(ready["serving"]), "became SERVING", timeout_s)

    def _wait(self, done: Callable[[dict[str, Any]], bool], what: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.ready()
            if ready is not None and done(ready):
                return ready
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name} never {what} within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM (the server drains), then SIGKILL if it has not exited within ``timeout_s``; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self._reap()

    def kill(self) -> int:
        """SIGKILL at once (no drain); its exit code."""
        if self.process.poll() is None:
            self.process.kill()
        return self._reap()

    def _reap(self) -> int:
        code = self.process.wait(timeout=30)
        if self._own_dir and self._final_log is None:
            self._final_log = self.log
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def server_env() -> dict[str, str]:
    """The environment of a server process: this one's, without COSTSERVE_* (they would change the defaults)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COSTSERVE_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def start_costserve(
    model_dir: Path | None,
    *flags: str,
    name: str = "costserve",
    workdir: Path | None = None,
    metrics: bool = False,
    serving: bool = False,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300,
    repository: Path | None = None,
) -> ServerProcess:
    """Start ``costserve-server serve`` on 127.0.0.1 port 0 with ``flags``; return once its ports are bound.

    It serves the one model of ``model_dir`` (``--model-dir``), or with ``repository`` every model of
    that repository (``--model-repository``; ``model_dir`` is then None). ``metrics`` serves /metrics
    on a free port (off otherwise); ``serving`` also waits until it is SERVING. ``workdir`` keeps the
    log and ready file (default: a temporary directory removed on stop); ``env`` adds environment
    variables. Raises :class:`ServerFailed` with the log's tail.
    """
    command = costserve_command(model_dir, 0, 0 if metrics else -1, *flags, repository=repository)
    server = ServerProcess(name, command, workdir, env)
    try:
        server.wait_bound(timeout_s)
        if serving:
            server.wait_serving(timeout_s)
    except BaseException:
        server.kill()
        raise
    return server


def costserve_command(
    model_dir: Path | None, port: int, metrics_port: int, *flags: str, repository: Path | None = None
) -> list[str]:
    """``costserve-server serve`` on 127.0.0.1 ``port`` (0: a free one), /metrics on ``metrics_port`` (-1: off).

    It serves ``--model-dir model_dir``, or ``--model-repository repository`` when that is given.
    """
    if (model_dir is None) == (repository is None):
        raise ValueError("give a model directory or a repository, not both or neither")
    models = ["--model-repository", str(repository)] if repository is not None else ["--model-dir", str(model_dir)]
    return [
        sys.executable, "-m", "costserve.server.cli", "serve", *models,
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), *flags,
    ]  # fmt: skip


def start_benchmark_server(
    model_dir: Path | None, *flags: str, name: str, workdir: Path, repository: Path | None = None
) -> ServerProcess:
    """costserve as the benchmarks run it: /metrics on, :data:`BENCHMARK_FLAGS`, its log kept in ``workdir``.

    It serves ``model_dir``, or with ``repository`` that model repository (``model_dir`` None).
    Returns once its ports are bound (call :meth:`ServerProcess.wait_serving` before measuring).
    """
    return start_costserve(
        model_dir, *BENCHMARK_FLAGS, *flags, name=name, workdir=workdir, metrics=True, repository=repository
    )


def start_ceiling(
    workdir: Path | None = None, response_file: Path | None = None, v2_response_file: Path | None = None
) -> ServerProcess:
    """Start :mod:`benchmarks.ceiling` on 127.0.0.1 port 0; return once it serves.

    It answers ``Predict`` with the PredictResponse in ``response_file`` and ``ModelInfer`` with the
    ModelInferResponse in ``v2_response_file`` (each default: its built-in answer).
    """
    command = [sys.executable, "-m", "benchmarks.ceiling", "--port", "0"]
    if response_file is not None:
        command += ["--response-file", str(response_file)]
    if v2_response_file is not None:
        command += ["--v2-response-file", str(v2_response_file)]
    server = ServerProcess("ceiling", command, workdir)
    try:
        server.wait_bound(60)
    except BaseException:
        server.kill()
        raise
    return server


def ensure_model(model_dir: Path) -> None:
    """Train the default model into ``model_dir`` when it holds no version (about 20 s)."""
    from costserve.server.repository.store import latest_version_dir

    if latest_version_dir(model_dir) is not None:
        return
    print(f"no model in {model_dir}: training the default one (costserve-server train)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "costserve.server.cli", "train", "--model-dir", str(model_dir)],
        check=True, cwd=REPO_ROOT, env=server_env(), timeout=900,
    )  # fmt: skip
