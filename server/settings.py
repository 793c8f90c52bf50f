"""One settings object for the server: every option declared once, with its unit and its limits.

Each field becomes a command-line flag (``max_batch_size`` -> ``--max-batch-size``)
and an environment variable (``COSTSERVE_MAX_BATCH_SIZE``). Precedence: flag, then
environment, then the default below. ``Settings`` validates on construction, so a
``Settings`` that exists is one the server can run with::

    Settings(port=0, max_batch_size=8)            # COSTSERVE_* variables fill the rest
    settings.model_copy(update={"port": 0})       # a copy; model_copy does not validate

pydantic-settings reads the environment and validates; the flags are plain argparse, added
from ``Settings.model_fields``: pydantic-settings' own CLI source cannot put each flag's
environment variable in its help, and argparse hands every raw value to the one validation.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "COSTSERVE_"

# COSTSERVE_* variables that the client commands read: not typos when set beside the server's.
CLIENT_ENV_VARS = frozenset(
    {
        "COSTSERVE_TARGET",
        "COSTSERVE_TENANT",
        "COSTSERVE_TOKEN",
        "COSTSERVE_TLS_CA",
        "COSTSERVE_CLIENT_CERT",
        "COSTSERVE_CLIENT_KEY",
        "COSTSERVE_METRICS_URL",
        "COSTSERVE_PROMETHEUS",
        "COSTSERVE_WINDOW",
    }
)


#: Settings that mean something only beside another: (field, the field it needs).
COMPANIONS = (
    ("tls_cert", "tls_key"),
    ("tls_key", "tls_cert"),
    ("tls_client_ca", "tls_cert"),
    ("tls_client_tenant", "tls_client_ca"),
    ("tls_client_tenant_pattern", "tls_client_tenant"),
    ("tls_client_gateways", "tls_client_tenant"),
    ("jwt_keys", "jwt_issuer"),
    ("jwt_keys", "jwt_audience"),
    ("jwt_issuer", "jwt_keys"),
    ("jwt_audience", "jwt_keys"),
    ("metrics_tls_cert", "metrics_tls_key"),
    ("metrics_tls_key", "metrics_tls_cert"),
    ("metrics_tls_client_ca", "metrics_tls_cert"),
)


def _is_set(value: object) -> bool:
    """Whether a setting is given: not unset, empty or off."""
    return value not in (None, "", "off")


class Settings(BaseSettings):
    """Server configuration. Times carry their unit in the name; sizes say theirs in the description."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    host: str = Field(
        "127.0.0.1", description="Address to bind gRPC and metrics to; 0.0.0.0 opens them to the network."
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port (printed at start-up).")
    metrics_port: int = Field(
        8000, ge=-1, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port, -1 turns it off."
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain of the gRPC port: with --tls-key, the port speaks TLS only. Reloaded "
        "when the file changes: new connections get the new certificate, open ones keep theirs.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert (reloaded with it).")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA certificates: with them, every client must present a certificate one of them signed "
        "(mTLS); needs --tls-cert. Reloaded when the file changes.",
    )
    tls_client_tenant: Literal["off", "common-name", "dns-san", "uri-san", "email-san"] = Field(
        "off",
        description="Which name of a client certificate gives its caller's tenant: off (certificates identify no "
        "tenant), common-name (the subject's CN), dns-san, uri-san or email-san (the first such subject "
        "alternative name that fits --tls-client-tenant-pattern); needs --tls-client-ca. Turns authentication on.",
    )
    tls_client_tenant_pattern: str = Field(
        "",
        description="Regular expression a certificate's name must match whole to name a tenant; its first group "
        "(or the whole name, without groups) is the tenant, e.g. 'spiffe://example.org/tenant/([^/]+)'. Empty: the "
        "whole name.",
    )
    tls_client_gateways: str = Field(
        "",
        description="Comma-separated tenants whose client certificates have the gateway role: they may charge "
        "calls to another tenant named by x-costserve-tenant.",
    )
    auth_keys: Path | None = Field(
        None,
        description="API keys file (TOML; made by `costserve-server keys add`): the SHA-256 hash of each key, never "
        "the key, with its tenant and role. Callers send 'authorization: Bearer <key>'. Re-read when the file "
        "changes: a removed key is refused from the next call on. Turns authentication on.",
    )
    jwt_keys: Path | None = Field(
        None,
        description="Public keys that sign JWT bearer tokens: a PEM public key or a JWKS document (JSON), re-read "
        "when the file changes. Tokens are checked for signature, --jwt-issuer, --jwt-audience and expiry. Turns "
        "authentication on.",
    )
    jwt_issuer: str = Field("", description="The issuer (iss claim) every JWT must name; needed with --jwt-keys.")
    jwt_audience: str = Field(
        "", description="The audience (aud claim) every JWT must include; needed with --jwt-keys."
    )
    jwt_tenant_claim: str = Field("tenant", description="The JWT claim that gives the caller's tenant.")
    jwt_role_claim: str = Field(
        "role", description="The JWT claim that gives the caller's role: gateway, or anything else (user)."
    )
    jwt_leeway_seconds: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="Clock skew allowed when checking a JWT's expiry and not-before times, in seconds.",
    )
    reflection: Literal["on", "authenticated", "off"] = Field(
        "authenticated",
        description="gRPC server reflection: on (anyone), authenticated (callers with valid credentials, or anyone "
        "when authentication is off) or off (not served).",
    )
    model_info: Literal["on", "authenticated", "off"] = Field(
        "authenticated",
        description="Model information (costserve.v1 GetModelInfo and ListModels, v2 ModelMetadata and "
        "RepositoryIndex, TF Serving GetModelMetadata and GetModelStatus): on (anyone), authenticated (callers "
        "with valid credentials, or anyone when authentication is off) or off (PERMISSION_DENIED).",
    )
    metrics_tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain of /metrics: with --metrics-tls-key, /metrics is served over HTTPS only. "
        "Reloaded when the file changes.",
    )
    metrics_tls_key: Path | None = Field(None, description="PEM private key of --metrics-tls-cert.")
    metrics_tls_client_ca: Path | None = Field(
        None,
        description="PEM CA certificates: with them, scrapers must present a certificate one of them signed; "
        "needs --metrics-tls-cert.",
    )
    metrics_basic_auth: Path | None = Field(
        None,
        description="File of 'user:hash' lines (made by `costserve-server metrics-password`): /metrics then asks "
        "for HTTP basic auth (401 without it). Re-read when the file changes.",
    )
    model_repository: Path = Field(
        Path("models"),
        description="Model repository: <repository>/<name>/<version>/, every model served at once, each by its "
        "version policy (<name>/model.toml; default: the newest version). With no model in it, the default "
        "digits model is trained into <repository>/digits first.",
    )
    model_dir: Path | None = Field(
        None,
        description="One model's base directory (<model_dir>/<version>/), served alone under the directory's name "
        "instead of --model-repository; with no version in it, the default model is trained into it first.",
    )
    default_model: str = Field(
        "",
        description="Model answering requests that name none; empty: digits if served, else the first by name.",
    )
    poll_seconds: float = Field(
        5.0,
        ge=0,
        description="How often the repository is checked for new, changed or removed versions, in seconds "
        "(SIGHUP checks at once); 0 checks only at start-up and on SIGHUP.",
    )
    max_images_per_request: int = Field(64, ge=1, description="Most images one PredictRequest may carry.")
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC message accepted or sent, in bytes (default 16 MiB).",
    )
    max_image_pixels: int = Field(
        0,
        ge=0,
        description="Largest image accepted, in pixels (width x height), checked from the file's header before it "
        "is decoded; 0 sizes it from the model's input: 1024 times its pixels, at least 1,048,576 (1 MP) and "
        "at most 16,777,216 (16 MP).",
    )
    max_request_pixels: int = Field(
        0,
        ge=0,
        description="Most pixels the images of one request may declare together; 0 means 4 times --max-image-pixels.",
    )
    decode_threads: int = Field(
        1,
        ge=1,
        description="Threads that decode and resize large PNG/JPEG images off the event loop (small ones are "
        "decoded inline: a hand-off would cost more than the decoding).",
    )
    max_decode_queue: int = Field(
        16, ge=0, description="Requests that may wait for a decode thread; past it requests get RESOURCE_EXHAUSTED."
    )
    max_concurrent_rpcs: int = Field(
        512,
        ge=1,
        description="Prediction and model calls of every protocol (costserve.v1; v2 ModelInfer, ModelMetadata, "
        "RepositoryIndex; TF Serving) handled at once, server-wide; past it calls get RESOURCE_EXHAUSTED at once. "
        "Health checks, reflection and v2 liveness and readiness are never refused.",
    )
    max_pending_calls: int = Field(
        256,
        ge=4,
        description="Calls gRPC may hold before the event loop takes them up; past it gRPC drops new calls "
        "(CANCELLED at the client, counted in costserve_grpc_calls_started_total). Under sustained overload the "
        "loop then takes up only calls that can still be answered in time, instead of a backlog that expired "
        "while it waited: keep it near what the server answers in half of its clients' deadline.",
    )
    max_streams_per_connection: int = Field(
        128,
        ge=1,
        description="Concurrent streams one HTTP/2 connection may open (SETTINGS_MAX_CONCURRENT_STREAMS); a client "
        "past it waits for a stream to free before sending.",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Most images in one runtime call; 1 turns batching off. Batches stop earlier where the cost "
        "per image measured on this host stops falling.",
    )
    batch_timeout_ms: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="Under load, how long a batch may wait for more images, counted from its first "
        "image's arrival, in milliseconds. An image arriving at an idle runtime never waits.",
    )
    batch_fill_timeout_ms: float = Field(
        20.0,
        ge=0,
        allow_inf_nan=False,
        description="Under saturation, how long a batch that is not full by --batch-timeout-ms may keep waiting, "
        "counted from its first image's arrival, in milliseconds. It waits only while the server is "
        "saturated (over the last 0.25 s the runtime had a batch nine tenths of the time, or the event loop was "
        "on CPU eight tenths of it), images arrive fast enough to fill it by then, and its images' deadlines "
        "allow. Full batches cost the least time per image; otherwise nothing waits longer than "
        "--batch-timeout-ms. At most --batch-timeout-ms turns it off.",
    )
    max_queue: int = Field(
        1024, ge=1, description="Images that may wait per variant; past it requests get RESOURCE_EXHAUSTED."
    )
    cache_size: int = Field(
        100_000,
        ge=0,
        description="Prediction cache capacity in entries (about 520 bytes each for 10 classes: 100,000 entries "
        "add ~50-60 MiB); 0 turns the cache off.",
    )
    cache_max_mb: float = Field(
        256.0,
        ge=0,
        description="Prediction cache capacity in MiB (estimated from each answer's size), across every model: "
        "the least recently used answers go first when either bound is reached; 0 turns the cache off.",
    )
    inference_threads: int = Field(
        1,
        ge=0,
        description="Threads each runtime may use inside one call; 0 lets the runtime choose (one per core). One "
        "keeps a small model's call on one core and the others free for the event loop; raise it for large "
        "models.",
    )
    fp32_runtime: Literal["litert", "tensorflow"] = Field(
        "litert",
        description="What serves fp32: litert runs the version's float LiteRT model (model_fp32.tflite, checked "
        "against the SavedModel when the version was made), so a process that serves no SavedModel never imports "
        "TensorFlow; tensorflow runs the SavedModel. A version without the float file is served by TensorFlow "
        "either way.",
    )
    workers: str = Field(
        "1",
        description="Serving processes on the one gRPC port (SO_REUSEPORT), each with its own event loop, under a "
        "supervisor that restarts a worker that exits and serves the machine's one /metrics; auto: one per core. "
        "Cost (utilization) and budgets are counted machine-wide.",
    )
    drain_grace_seconds: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="On SIGTERM/SIGINT, how long the server keeps answering new calls after health turns "
        "NOT_SERVING (so that clients and load balancers see it), in seconds; then new calls get UNAVAILABLE.",
    )
    drain_seconds: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="After that grace, how long calls in flight may take to finish before the server stops "
        "anyway, in seconds.",
    )
    prices: Path | None = Field(
        None,
        description="TOML price file: prices per vCPU-hour, GB-hour and GB moved, the provisioned vCPUs and "
        "memory, and the utilization window (see deploy/prices.toml); unset uses the built-in defaults.",
    )
    policy: Literal["accuracy_first", "cost_first"] = Field(
        "accuracy_first",
        description="How PRECISION_AUTO is answered: accuracy_first (the most accurate variant while capacity is "
        "free) or cost_first (the variant measured cheaper per image on this host, whenever it meets the request's "
        "accuracy floor).",
    )
    latency_slo_ms: float = Field(
        100.0,
        gt=0,
        allow_inf_nan=False,
        description="Latency objective, in milliseconds: AUTO traffic moves to the variant measured faster on this "
        "host when the longest predicted queue wait passes half of it, and back once load stays low.",
    )
    over_slo: Literal["queue", "refuse"] = Field(
        "queue",
        description="What a PRECISION_AUTO request gets when every variant it may use is predicted to wait in the "
        "server for more than a quarter of the latency objective: queue (it waits, up to --max-queue and "
        "its deadline) or refuse (RESOURCE_EXHAUSTED at once, so the requests accepted keep the objective "
        "under overload). Explicit precisions always queue.",
    )
    budgets: Path | None = Field(
        None,
        description="TOML budgets file: USD per hour or per day for each tenant (the caller's, or with authentication "
        "off the one x-costserve-tenant names; see deploy/budgets.toml); unset means no budgets.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level: DEBUG, INFO, WARNING or ERROR."
    )
    ready_file: Path | None = Field(
        None,
        description="When set, the server writes this JSON file (atomically: a launcher sees all of it or nothing) "
        'once its ports are bound, and again once it is SERVING: {"pid", "host", "port", "metrics_port", '
        '"serving"} with the ports actually bound (useful with port 0; metrics_port is 0 when /metrics is off). '
        "It is removed when the drain starts.",
    )

    @field_validator("workers")
    @classmethod
    def _workers_is_a_count_or_auto(cls, value: str) -> str:
        text = value.strip().lower()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise ValueError("must be a whole number, at least 1, or auto")
        return text

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    # A one-field rule, so a field validator: its error names the field like the limits above.
    @field_validator("model_dir", "model_repository")
    @classmethod
    def _model_dir_names_a_directory(cls, value: Path | None) -> Path | None:
        if value == Path("."):
            raise ValueError("must name a directory (not empty and not the working directory itself)")
        return value

    @model_validator(mode="after")
    def _companions_are_set(self) -> Settings:
        for field, other in COMPANIONS:
            if _is_set(getattr(self, field)) and not _is_set(getattr(self, other)):
                raise PydanticCustomError(
                    "needs_field", "{field} needs {other}", {"field": field, "other": other, "value": "set"}
                )
        return self

    @property
    def authentication(self) -> bool:
        """Whether callers must present credentials: an API keys file, JWT keys or certificate tenants."""
        return self.auth_keys is not None or self.jwt_keys is not None or self.tls_client_tenant != "off"

    @model_validator(mode="after")
    def _images_per_request_fit_the_queue(self) -> Settings:
        # A request is queued whole: one larger than the queue could never be accepted.
        if self.max_images_per_request > self.max_queue:
            raise PydanticCustomError(
                "at_most_field",
                "{field} must be at most {other} ({limit}), got {value}",
                {
                    "field": "max_images_per_request",
                    "other": "max_queue",
                    "limit": self.max_queue,
                    "value": self.max_images_per_request,
                },
            )
        return self

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


def flag(name: str) -> str:
    """Command-line flag of a settings field: ``max_queue`` -> ``--max-queue``."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """Environment variable of a settings field: ``max_queue`` -> ``COSTSERVE_MAX_QUEUE``."""
    return ENV_PREFIX + name.upper()


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Settings field, documented with its environment variable and default.

    Flags keep their raw text (``None`` when absent): ``settings_from_args`` validates every
    flag and variable together, so one run reports every bad value.
    """
    for name, info in Settings.model_fields.items():
        parser.add_argument(
            flag(name),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{info.description} [env {env_var(name)}, default {info.default}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build Settings from parsed flags, falling back to ``COSTSERVE_*`` variables, then defaults.

    Raises ``pydantic.ValidationError`` for bad values; ``describe_problems`` words them.
    """
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


def describe_problems(error: ValidationError) -> list[str]:
    """One line per bad value, naming its flag and environment variable and what is allowed.

    Example: ``--max-batch-size (COSTSERVE_MAX_BATCH_SIZE): must be at least 1, got 0``.
    """
    return [_describe(details) for details in error.errors()]


def _describe(details: ErrorDetails) -> str:
    ctx = details.get("ctx", {})
    kind = details["type"]
    if kind == "at_most_field":
        name = ctx["field"]
        return f"{_names(name)}: must be at most {_names(ctx['other'])}, which is {ctx['limit']}, got {ctx['value']}"
    if kind == "needs_field":
        return f"{_names(ctx['field'])}: needs {_names(ctx['other'])} as well"
    name = str(details["loc"][0]) if details["loc"] else ""
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": f"at least {ctx.get('ge')}",
            "greater_than": f"more than {ctx.get('gt')}",
            "less_than_equal": f"at most {ctx.get('le')}",
            "less_than": f"less than {ctx.get('lt')}",
        }[kind]
        allowed = f"must be {bound}"
    elif kind in ("int_parsing", "int_from_float", "int_type"):
        allowed = "must be a whole number"
    elif kind in ("float_parsing", "float_type"):
        allowed = "must be a number"
    elif kind == "finite_number":
        allowed = "must be a finite number"
    elif kind == "literal_error":
        allowed = f"must be {ctx.get('expected')}"
    elif kind == "value_error":
        allowed = str(ctx.get("error"))
    else:
        allowed = details["msg"]
    shown = details["input"]
    shown = repr(shown) if shown == "" else shown
    return f"{_names(name)}: {allowed}, got {shown}" if name else f"{allowed}, got {shown}"


def _names(name: str) -> str:
    return f"{flag(name)} ({env_var(name)})"


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``COSTSERVE_*`` variables that name no setting (and no client option): likely typos.

    They are warned about, not refused, so that a variable meant for another costserve
    version or tool does not stop the server.
    """
    known = {env_var(name) for name in Settings.model_fields}
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in CLIENT_ENV_VARS:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{variable} names no setting and is ignored{hint}")
    return warnings
