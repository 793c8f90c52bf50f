"""One settings object for the server: every option declared once, with its unit.

Each field becomes a command-line flag (``max_batch_size`` -> ``--max-batch-size``)
and an environment variable (``COSTSERVE_MAX_BATCH_SIZE``). Precedence: flag, then
environment, then the default below.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "COSTSERVE_"


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Server configuration. Times carry their unit in the name; sizes say theirs in the help."""

    host: str = _option("127.0.0.1", "Address to bind gRPC and metrics to; 0.0.0.0 opens them to the network.")
    port: int = _option(50051, "gRPC port; 0 picks a free port (printed at start-up).")
    metrics_port: int = _option(8000, "Prometheus /metrics HTTP port; 0 picks a free port, -1 turns it off.")
    model_dir: Path = _option(
        Path("models/digits"),
        "Model base directory in TensorFlow Serving layout (<model_dir>/<version>/). "
        "The highest version is served; with none, the default model is trained first.",
    )
    max_images_per_request: int = _option(64, "Most images one PredictRequest may carry.")
    max_message_bytes: int = _option(
        16 * 1024 * 1024, "Largest gRPC message accepted or sent, in bytes (default 16 MiB)."
    )
    max_image_pixels: int = _option(
        0,
        "Largest image accepted, in pixels (width x height), checked from the file's header before it is "
        "decoded; 0 sizes it from the model's input: 1024 times its pixels, at least 1,048,576 (1 MP) and "
        "at most 16,777,216 (16 MP).",
    )
    max_request_pixels: int = _option(
        0, "Most pixels the images of one request may declare together; 0 means 4 times --max-image-pixels."
    )
    decode_threads: int = _option(
        1,
        "Threads that decode and resize large PNG/JPEG images off the event loop (small ones are decoded "
        "inline: a hand-off would cost more than the decoding).",
    )
    max_decode_queue: int = _option(
        16, "Requests that may wait for a decode thread; past it requests get RESOURCE_EXHAUSTED."
    )
    max_concurrent_rpcs: int = _option(
        512,
        "Prediction calls (Predict, PredictStream, GetModelInfo) handled at once, server-wide; past it calls "
        "get RESOURCE_EXHAUSTED at once. Health checks and reflection are never refused.",
    )
    max_pending_calls: int = _option(
        256,
        "Calls gRPC may hold before the event loop takes them up; past it gRPC drops new calls (CANCELLED at "
        "the client, counted in costserve_grpc_calls_started_total). Under sustained overload the loop then "
        "takes up only calls that can still be answered in time, instead of a backlog that expired while it "
        "waited: keep it near what the server answers in half of its clients' deadline.",
    )
    max_streams_per_connection: int = _option(
        128,
        "Concurrent streams one HTTP/2 connection may open (SETTINGS_MAX_CONCURRENT_STREAMS); a client "
        "past it waits for a stream to free before sending.",
    )
    max_batch_size: int = _option(32, "Most images in one runtime call; 1 turns batching off.")
    batch_timeout_ms: float = _option(
        2.0,
        "Under load, how long a batch may wait for more images, counted from its first "
        "image's arrival, in milliseconds. An image arriving at an idle runtime never waits.",
    )
    batch_fill_timeout_ms: float = _option(
        20.0,
        "Under saturation, how long a batch that is not full by --batch-timeout-ms may keep waiting, "
        "counted from its first image's arrival, in milliseconds. It waits only while the server is "
        "saturated (over the last 0.25 s the runtime had a batch nine tenths of the time, or the event loop was on "
        "CPU eight tenths of it), images arrive fast enough to fill it by then, and its images' deadlines allow. "
        "Full batches cost the least time per image; otherwise nothing waits longer than "
        "--batch-timeout-ms. At most --batch-timeout-ms turns it off.",
    )
    max_queue: int = _option(
        1024, "Images that may wait per variant; past it requests get RESOURCE_EXHAUSTED."
    )
    cache_size: int = _option(
        100_000,
        "Prediction cache capacity in entries (about 520 bytes each for 10 classes: 100,000 entries add ~50-60 MiB); 0 turns the cache off.",
    )
    inference_threads: int = _option(
        1,
        "Threads each runtime may use inside one call; 0 lets the runtime choose (one per core). One keeps "
        "a small model's call on one core and the others free for the event loop; raise it for large models.",
    )
    drain_grace_seconds: float = _option(
        2.0,
        "On SIGTERM/SIGINT, how long the server keeps answering new calls after health turns NOT_SERVING "
        "(so that clients and load balancers see it), in seconds; then new calls get UNAVAILABLE.",
    )
    drain_seconds: float = _option(
        30.0,
        "After that grace, how long calls in flight may take to finish before the server stops anyway, "
        "in seconds.",
    )
    prices: Path | None = _option(
        None,
        "TOML price file: prices per vCPU-hour, GB-hour and GB moved, the provisioned vCPUs and memory, "
        "and the utilization window (see deploy/prices.toml); unset uses the built-in defaults.",
    )
    policy: str = _option(
        "accuracy_first",
        "How PRECISION_AUTO is answered: accuracy_first (fp32 while capacity is free) or "
        "cost_first (int8, the cheaper variant, whenever it meets the request's accuracy floor).",
    )
    latency_slo_ms: float = _option(
        100.0,
        "Latency objective, in milliseconds: AUTO traffic moves to int8 when the predicted fp32 wait "
        "passes half of it, and back once load stays low.",
    )
    over_slo: str = _option(
        "queue",
        "What a PRECISION_AUTO request gets when every variant it may use is predicted to wait in the "
        "server for more than a quarter of the latency objective: queue (it waits, up to --max-queue and "
        "its deadline) or refuse (RESOURCE_EXHAUSTED at once, so the requests accepted keep the objective "
        "under overload). Explicit precisions always queue.",
    )
    budgets: Path | None = _option(
        None,
        "TOML budgets file: USD per hour or per day for each tenant named by the x-costserve-tenant "
        "request metadata (see deploy/budgets.toml); unset means no budgets.",
    )
    log_level: str = _option("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    ready_file: Path | None = _option(
        None,
        "When set, the server writes this JSON file (atomically: a launcher sees all of it or nothing) once its "
        'ports are bound, and again once it is SERVING: {"pid", "host", "port", "metrics_port", "serving"} with '
        "the ports actually bound (useful with port 0; metrics_port is 0 when /metrics is off). It is removed "
        "when the drain starts.",
    )

    @property
    def batch_timeout_s(self) -> float:
        """``batch_timeout_ms`` in seconds."""
        return self.batch_timeout_ms / 1000.0

    @property
    def batch_fill_timeout_s(self) -> float:
        """``batch_fill_timeout_ms`` in seconds."""
        return self.batch_fill_timeout_ms / 1000.0

    @property
    def latency_slo_s(self) -> float:
        """``latency_slo_ms`` in seconds."""
        return self.latency_slo_ms / 1000.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """Environment variable of a settings field: ``max_queue`` -> ``COSTSERVE_MAX_QUEUE``."""
    return ENV_PREFIX + name.upper()


def _field_type(settings_field: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "Path": Path, "Path | None": Path}[str(settings_field.type)]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Settings field; defaults come from the environment or the field."""
    for settings_field in dataclasses.fields(Settings):
        parser.add_argument(
            _flag(settings_field.name),
            dest=settings_field.name,
            type=_field_type(settings_field),
            default=None,
            help=f"{settings_field.metadata['help']} [env {env_var(settings_field.name)}, "
            f"default {settings_field.default}]",
        )


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """Build Settings from parsed flags, falling back to ``COSTSERVE_*`` variables, then defaults."""
    values: dict[str, Any] = {}
    for settings_field in dataclasses.fields(Settings):
        value = getattr(args, settings_field.name, None)
        if value is None and env_var(settings_field.name) in environ:
            raw = environ[env_var(settings_field.name)]
            try:
                value = _field_type(settings_field)(raw)
            except ValueError:
                raise SystemExit(
                    f"{env_var(settings_field.name)}={raw!r} is not a valid {_field_type(settings_field).__name__}"
                ) from None
        if value is not None:
            values[settings_field.name] = value
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Refuse settings that cannot work, with a message naming the option."""
    problems = []
    if settings.max_batch_size < 1:
        problems.append("--max-batch-size must be at least 1")
    if settings.max_queue < 1:
        problems.append("--max-queue must be at least 1")
    if settings.max_images_per_request < 1:
        problems.append("--max-images-per-request must be at least 1")
    if settings.max_images_per_request > settings.max_queue:
        problems.append("--max-images-per-request must not exceed --max-queue")
    if settings.cache_size < 0:
        problems.append("--cache-size must be 0 (off) or more")
    if not 0 <= settings.batch_timeout_ms < math.inf:
        problems.append("--batch-timeout-ms must be a finite number, 0 or more")
    if not 0 <= settings.batch_fill_timeout_ms < math.inf:
        problems.append("--batch-fill-timeout-ms must be a finite number, 0 or more")
    if settings.max_image_pixels < 0:
        problems.append("--max-image-pixels must be 0 (sized from the model) or more")
    if settings.max_request_pixels < 0:
        problems.append("--max-request-pixels must be 0 (4 times --max-image-pixels) or more")
    if settings.decode_threads < 1:
        problems.append("--decode-threads must be at least 1")
    if settings.max_decode_queue < 0:
        problems.append("--max-decode-queue must be 0 or more")
    if settings.max_concurrent_rpcs < 1:
        problems.append("--max-concurrent-rpcs must be at least 1")
    if settings.max_pending_calls < 4:
        problems.append("--max-pending-calls must be at least 4")
    if settings.max_streams_per_connection < 1:
        problems.append("--max-streams-per-connection must be at least 1")
    if not 0 <= settings.drain_grace_seconds < math.inf:
        problems.append("--drain-grace-seconds must be a finite number, 0 or more")
    if not 0 <= settings.drain_seconds < math.inf:
        problems.append("--drain-seconds must be a finite number, 0 or more")
    if not 0 <= settings.port <= 65535:
        problems.append("--port must be 0 (any free port) to 65535")
    if not -1 <= settings.metrics_port <= 65535:
        problems.append("--metrics-port must be -1 (off), 0 (any free port) or up to 65535")
    if settings.inference_threads < 0:
        problems.append("--inference-threads must be 0 (runtime default) or more")
    if not str(settings.model_dir).strip() or settings.model_dir == Path("."):
        problems.append("--model-dir must name a directory (not empty and not the working directory itself)")
    if settings.max_message_bytes < 1024:
        problems.append("--max-message-bytes must be at least 1024")
    if settings.policy not in ("cost_first", "accuracy_first"):
        problems.append("--policy must be cost_first or accuracy_first")
    if settings.over_slo not in ("queue", "refuse"):
        problems.append("--over-slo must be queue or refuse")
    if not 0 < settings.latency_slo_ms < math.inf:
        problems.append("--latency-slo-ms must be a finite number above 0")
    if problems:
        raise SystemExit("invalid settings: " + "; ".join(problems))
