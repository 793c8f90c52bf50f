"""Unit tests for the settings object, its flags and COSTSERVE_* variables (costserve.server.settings)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import pytest

from costserve.server.settings import Settings, add_settings_arguments, env_var, settings_from_args

FIELDS = dataclasses.fields(Settings)
FIELD_NAMES = [settings_field.name for settings_field in FIELDS]

# A valid value for every field, different from its default, as a flag/env string and as parsed.
SAMPLES: dict[str, tuple[str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("6000", 6000),
    "metrics_port": ("-1", -1),
    "model_dir": ("/srv/models/mnist", Path("/srv/models/mnist")),
    "max_images_per_request": ("8", 8),
    "max_message_bytes": ("4096", 4096),
    "max_image_pixels": ("4000000", 4_000_000),
    "max_request_pixels": ("9000000", 9_000_000),
    "decode_threads": ("2", 2),
    "max_decode_queue": ("0", 0),
    "max_concurrent_rpcs": ("100", 100),
    "max_pending_calls": ("64", 64),
    "max_streams_per_connection": ("32", 32),
    "max_batch_size": ("4", 4),
    "batch_timeout_ms": ("0.5", 0.5),
    "batch_fill_timeout_ms": ("5", 5.0),
    "max_queue": ("100", 100),
    "cache_size": ("0", 0),
    "inference_threads": ("2", 2),
    "drain_seconds": ("1.5", 1.5),
    "drain_grace_seconds": ("0.5", 0.5),
    "prices": ("/etc/costserve/prices.toml", Path("/etc/costserve/prices.toml")),
    "log_level": ("DEBUG", "DEBUG"),
    "policy": ("cost_first", "cost_first"),
    "latency_slo_ms": ("250", 250.0),
    "over_slo": ("refuse", "refuse"),
    "budgets": ("/etc/costserve/budgets.toml", Path("/etc/costserve/budgets.toml")),
    "ready_file": ("/run/costserve/ready.json", Path("/run/costserve/ready.json")),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costserve-server", exit_on_error=False)
    add_settings_arguments(parser)
    return parser


def _settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    return settings_from_args(_parser().parse_args(argv or []), environ=environ or {})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_samples_cover_every_field() -> None:
    assert set(SAMPLES) == set(FIELD_NAMES)
    defaults = Settings()
    for name, (_, parsed) in SAMPLES.items():
        assert getattr(defaults, name) != parsed, name


# --- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    settings = _settings()
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.metrics_port == 8000
    assert isinstance(settings.model_dir, Path)
    assert settings.max_images_per_request <= settings.max_queue
    assert settings.max_batch_size >= 1
    assert settings.batch_timeout_ms >= 0


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_os_environ_is_ignored_when_environ_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTSERVE_PORT", "6001")
    assert _settings(environ={}).port == 50051


# --- every field has a flag and an environment variable --------------------------------


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_env_var_name(name: str) -> None:
    assert env_var(name) == "COSTSERVE_" + name.upper()


def test_env_var_examples() -> None:
    assert env_var("max_queue") == "COSTSERVE_MAX_QUEUE"
    assert env_var("batch_timeout_ms") == "COSTSERVE_BATCH_TIMEOUT_MS"


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_has_a_flag(name: str) -> None:
    text, parsed = SAMPLES[name]
    settings = _settings([f"{_flag(name)}={text}"])
    value = getattr(settings, name)
    assert value == parsed
    assert type(value) is type(parsed)
    others = {other: getattr(Settings(), other) for other in FIELD_NAMES if other != name}
    assert {other: getattr(settings, other) for other in others} == others


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_has_an_env_var_converted_to_its_type(name: str) -> None:
    text, parsed = SAMPLES[name]
    settings = _settings(environ={env_var(name): text})
    value = getattr(settings, name)
    assert value == parsed
    assert type(value) is type(parsed)


def test_flags_are_documented_with_their_env_var() -> None:
    help_text = " ".join(_parser().format_help().split())
    for name in FIELD_NAMES:
        assert _flag(name) in help_text
        assert env_var(name) in help_text


def test_all_env_vars_at_once() -> None:
    environ = {env_var(name): text for name, (text, _) in SAMPLES.items()}
    settings = _settings(environ=environ)
    assert settings == Settings(**{name: parsed for name, (_, parsed) in SAMPLES.items()})


def test_unrelated_env_vars_are_ignored() -> None:
    environ = {"PORT": "1", "COSTSERVE_UNKNOWN": "x", "costserve_port": "2"}
    assert _settings(environ=environ) == Settings()


# --- precedence -------------------------------------------------------------------------


def test_flag_beats_env_beats_default() -> None:
    environ = {"COSTSERVE_PORT": "7000", "COSTSERVE_MAX_QUEUE": "500"}
    settings = _settings(["--port", "9000"], environ)
    assert settings.port == 9000  # flag over env
    assert settings.max_queue == 500  # env over default
    assert settings.metrics_port == 8000  # default


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_flag_beats_env_for_every_field(name: str) -> None:
    text, parsed = SAMPLES[name]
    default_text = str(getattr(Settings(), name))
    settings = _settings([f"{_flag(name)}={text}"], {env_var(name): default_text})
    assert getattr(settings, name) == parsed


def test_flag_equal_to_zero_still_beats_env() -> None:
    settings = _settings(["--cache-size", "0", "--port", "0"], {"COSTSERVE_CACHE_SIZE": "50", "COSTSERVE_PORT": "7"})
    assert settings.cache_size == 0
    assert settings.port == 0


# --- invalid values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("COSTSERVE_PORT", "abc"),
        ("COSTSERVE_MAX_QUEUE", "1.5"),
        ("COSTSERVE_BATCH_TIMEOUT_MS", "soon"),
        ("COSTSERVE_CACHE_SIZE", ""),
    ],
)
def test_invalid_env_value_exits_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SystemExit) as caught:
        _settings(environ={variable: raw})
    message = str(caught.value.code)
    assert variable in message
    assert repr(raw) in message


def test_invalid_flag_value_is_refused_by_the_parser() -> None:
    with pytest.raises(argparse.ArgumentError) as caught:
        _parser().parse_args(["--port", "abc"])
    assert "--port" in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "environ", "option"),
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size"),
        ([], {"COSTSERVE_MAX_BATCH_SIZE": "-3"}, "--max-batch-size"),
        (["--max-queue", "0", "--max-images-per-request", "1"], {}, "--max-queue"),
        (["--cache-size", "-1"], {}, "--cache-size"),
        (["--max-images-per-request", "11", "--max-queue", "10"], {}, "--max-images-per-request"),
        ([], {"COSTSERVE_MAX_QUEUE": "10"}, "--max-images-per-request"),
        (["--max-images-per-request", "0"], {}, "--max-images-per-request"),
        (["--batch-timeout-ms", "-0.1"], {}, "--batch-timeout-ms"),
        (["--over-slo", "drop"], {}, "--over-slo"),
        (["--max-message-bytes", "100"], {}, "--max-message-bytes"),
        (["--max-image-pixels", "-1"], {}, "--max-image-pixels"),
        (["--max-request-pixels", "-1"], {}, "--max-request-pixels"),
        (["--decode-threads", "0"], {}, "--decode-threads"),
        (["--max-decode-queue", "-1"], {}, "--max-decode-queue"),
        ([], {"COSTSERVE_MAX_CONCURRENT_RPCS": "0"}, "--max-concurrent-rpcs"),
        (["--max-streams-per-connection", "0"], {}, "--max-streams-per-connection"),
        (["--max-pending-calls", "3"], {}, "--max-pending-calls"),
        (["--drain-grace-seconds", "-1"], {}, "--drain-grace-seconds"),
    ],
)
def test_invalid_combinations_exit_naming_the_option(argv: list[str], environ: dict[str, str], option: str) -> None:
    with pytest.raises(SystemExit) as caught:
        _settings(argv, environ)
    assert option in str(caught.value.code)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SystemExit) as caught:
        _settings(["--max-batch-size", "0", "--cache-size", "-1", "--batch-timeout-ms", "-1"])
    message = str(caught.value.code)
    for option in ("--max-batch-size", "--cache-size", "--batch-timeout-ms"):
        assert option in message


def test_boundary_values_are_accepted() -> None:
    settings = _settings(
        ["--max-batch-size", "1", "--max-queue", "1", "--max-images-per-request", "1", "--cache-size", "0"]
        + ["--batch-timeout-ms", "0", "--max-message-bytes", "1024"]
    )
    assert (settings.max_batch_size, settings.max_queue, settings.max_images_per_request) == (1, 1, 1)
    assert settings.cache_size == 0
    assert settings.batch_timeout_ms == 0.0
    assert settings.max_message_bytes == 1024


# --- derived values ---------------------------------------------------------------------


@pytest.mark.parametrize(("ms", "seconds"), [(2.0, 0.002), (0.0, 0.0), (1500.0, 1.5), (0.5, 0.0005)])
def test_batch_timeout_s_converts_milliseconds_to_seconds(ms: float, seconds: float) -> None:
    assert Settings(batch_timeout_ms=ms).batch_timeout_s == pytest.approx(seconds)


def test_default_batch_timeout_s() -> None:
    settings = Settings()
    assert settings.batch_timeout_s == pytest.approx(settings.batch_timeout_ms / 1000)
