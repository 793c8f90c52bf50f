"""What a load test does: the load steps, the inputs' repeat mix, and every setting (:class:`LoadtestConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from costserve.client import DEFAULT_TIMEOUT_S, PRECISIONS, TlsFiles, token_metadata
from costserve.loadtest.protocols import CODECS, PROTOCOLS

#: Default Zipf catalog size, in distinct inputs.
DEFAULT_CATALOG = 10_000


@dataclass(frozen=True)
class RepeatSpec:
    """How inputs repeat: a ``fraction`` of images re-sent, or Zipf popularity with ``zipf_exponent``."""

    fraction: float = 0.0
    zipf_exponent: float | None = None

    @classmethod
    def parse(cls, text: str) -> RepeatSpec:
        """``"0.3"`` (a fraction in [0, 1]) or ``"zipf:1.1"`` (an exponent >= 0)."""
        text = text.strip().lower()
        if text.startswith("zipf:"):
            exponent = float(text.removeprefix("zipf:"))
            if not exponent >= 0:
                raise ValueError(f"--repeat {text}: the Zipf exponent must be >= 0")
            return cls(zipf_exponent=exponent)
        fraction = float(text)
        if not 0 <= fraction <= 1:
            raise ValueError(f"--repeat {text}: a fraction must be in [0, 1], or use zipf:EXPONENT")
        return cls(fraction=fraction)

    def __str__(self) -> str:
        if self.zipf_exponent is not None:
            return f"zipf:{self.zipf_exponent:g}"
        return f"{self.fraction:g}"


@dataclass(frozen=True)
class LoadStep:
    """One load level: ``closed`` loop with ``value`` callers, or ``open`` loop at ``value`` requests/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        """``concurrency 16`` or ``rate 200/s``."""
        return f"concurrency {int(self.value)}" if self.mode == "closed" else f"rate {self.value:g}/s"


@dataclass(frozen=True)
class LoadtestConfig:
    """Everything a load test does. Give ``concurrency`` (closed loop) or ``rate`` (open loop), one value per step.

    Stops each step after ``duration_s`` seconds or ``requests`` requests, whichever comes first (10 s
    when neither is set); ``warmup_s`` of the same load runs before each step and is not counted.
    Every request asks ``model`` (``""``: the server's default) at ``model_version`` (``""``: its latest),
    through ``protocol``: ``v1`` (costserve.v1), ``v2`` (the Open Inference Protocol) or ``tfserving``
    (TensorFlow Serving's API); see :mod:`costserve.loadtest.protocols`.
    ``inputs``: a folder of PNG/JPEG files to send instead of the held-out digits, one sub-folder per
    class (ImageFolder layout) or flat (no labels); see :mod:`costserve.loadtest.inputs`.
    ``token``: a bearer token (an API key or a JWT) every call carries as ``authorization: Bearer
    <token>``, in plain text unless TLS is set; it is left out of the config's repr, and the
    report's JSON says only whether one was set.
    """

    target: str = "127.0.0.1:50051"
    concurrency: tuple[int, ...] = ()
    rate: tuple[float, ...] = ()
    arrivals: str = "poisson"
    duration_s: float | None = None
    requests: int | None = None
    warmup_s: float = 1.0
    repeat: RepeatSpec = RepeatSpec()
    catalog: int = DEFAULT_CATALOG
    images_per_request: int = 1
    precision: str = "auto"
    deadline_ms: float | None = None
    skip_cache: bool = False
    stream: bool = False
    processes: int = 1
    channels: int = 4
    timeout_s: float = DEFAULT_TIMEOUT_S
    seed: int = 0
    model: str = ""
    model_version: str = ""
    inputs: str | None = None
    protocol: str = "v1"
    #: TLS: the server's CA, and a client certificate and key for mTLS (PEM file paths; None: unset).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files, None for plain text."""
        return TlsFiles.of(self.tls_ca, self.tls_cert, self.tls_key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The request metadata every call carries: the token's (none without one)."""
        return token_metadata(self.token)

    def steps(self) -> list[LoadStep]:
        """The load levels, in order."""
        if self.rate:
            return [LoadStep("open", float(rate)) for rate in self.rate]
        return [LoadStep("closed", float(users)) for users in (self.concurrency or (1,))]

    @property
    def call_timeout_s(self) -> float:
        """Deadline of each unary call, in seconds."""
        return self.deadline_ms / 1000 if self.deadline_ms is not None else self.timeout_s

    @property
    def step_duration_s(self) -> float | None:
        """Measured seconds per step: ``duration_s``, or 10 s when neither a duration nor a count is set."""
        if self.duration_s is None and self.requests is None:
            return 10.0
        return self.duration_s

    def validate(self) -> None:
        """Raise ValueError, with a message naming the flag, on settings that cannot run."""
        if self.concurrency and self.rate:
            raise ValueError("give a concurrency (closed loop) or a rate (open loop), not both")
        if any(users < 1 for users in self.concurrency):
            raise ValueError("--concurrency must be at least 1")
        if any(not rate > 0 for rate in self.rate):
            raise ValueError("--rate must be above 0 requests/s")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError("--arrivals is poisson or constant")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("--duration must be above 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be at least 1")
        if self.warmup_s < 0:
            raise ValueError("--warmup must be 0 or more seconds")
        if self.images_per_request < 1:
            raise ValueError("--images-per-request must be at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision is one of {', '.join(PRECISIONS)}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ValueError("--deadline-ms must be above 0")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol is one of {', '.join(PROTOCOLS)}")
        if self.stream and self.protocol != "v1":
            raise ValueError(
                f"--stream pipelines requests on costserve.v1's PredictStream; --protocol {self.protocol} has no "
                "stream, so each request is its own call (drop --stream)"
            )
        unsupported = CODECS[self.protocol].unsupported(self)
        if unsupported is not None:
            raise ValueError(unsupported)
        if self.stream and self.deadline_ms is not None:
            raise ValueError("--deadline-ms sets a deadline per call; a stream has one deadline for all its requests")
        if self.processes < 1 or self.channels < 1:
            raise ValueError("--processes and --channels must be at least 1")
        if not self.rate and self.processes > min(self.concurrency or (1,)):
            raise ValueError("--processes cannot exceed --concurrency (each process needs at least one caller)")
        if self.catalog < 1:
            raise ValueError("--catalog must be at least 1")
        if self.seed < 0:
            raise ValueError("--seed must be 0 or more")
        if self.inputs is not None and not Path(self.inputs).is_dir():
            raise ValueError(f"--inputs {self.inputs}: not a directory")
        try:
            token_metadata(self.token)
        except ValueError as error:  # its message never quotes the token
            raise ValueError(f"--token: {error}") from None
