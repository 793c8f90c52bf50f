"""Unit tests for the settings object, its flags and COSTSERVE_* variables (costserve.server.settings)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from costserve.server.cli import main
from costserve.server.settings import (
    COMPANIONS,
    Settings,
    add_settings_arguments,
    describe_problems,
    env_var,
    flag,
    settings_from_args,
    unknown_env_vars,
)

FIELD_NAMES = list(Settings.model_fields)

# A valid value for every field, different from its default, as a flag/env string and as parsed.
SAMPLES: dict[str, tuple[str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("6000", 6000),
    "metrics_port": ("-1", -1),
    "model_repository": ("/srv/models", Path("/srv/models")),
    "model_dir": ("/srv/models/mnist", Path("/srv/models/mnist")),
    "default_model": ("shapes", "shapes"),
    "poll_seconds": ("0.5", 0.5),
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
    "cache_max_mb": ("64", 64.0),
    "inference_threads": ("2", 2),
    "workers": ("auto", "auto"),
    "fp32_runtime": ("tensorflow", "tensorflow"),
    "drain_seconds": ("1.5", 1.5),
    "drain_grace_seconds": ("0.5", 0.5),
    "prices": ("/etc/costserve/prices.toml", Path("/etc/costserve/prices.toml")),
    "log_level": ("DEBUG", "DEBUG"),
    "policy": ("cost_first", "cost_first"),
    "latency_slo_ms": ("250", 250.0),
    "over_slo": ("refuse", "refuse"),
    "budgets": ("/etc/costserve/budgets.toml", Path("/etc/costserve/budgets.toml")),
    "ready_file": ("/run/costserve/ready.json", Path("/run/costserve/ready.json")),
    "tls_cert": ("/etc/costserve/tls/server.pem", Path("/etc/costserve/tls/server.pem")),
    "tls_key": ("/etc/costserve/tls/server.key", Path("/etc/costserve/tls/server.key")),
    "tls_client_ca": ("/etc/costserve/tls/clients-ca.pem", Path("/etc/costserve/tls/clients-ca.pem")),
    "tls_client_tenant": ("uri-san", "uri-san"),
    "tls_client_tenant_pattern": ("spiffe://example.org/tenant/([^/]+)", "spiffe://example.org/tenant/([^/]+)"),
    "tls_client_gateways": ("batch,edge", "batch,edge"),
    "auth_keys": ("/etc/costserve/keys.toml", Path("/etc/costserve/keys.toml")),
    "jwt_keys": ("/etc/costserve/jwks.json", Path("/etc/costserve/jwks.json")),
    "jwt_issuer": ("https://login.example.com/", "https://login.example.com/"),
    "jwt_audience": ("costserve", "costserve"),
    "jwt_tenant_claim": ("org", "org"),
    "jwt_role_claim": ("costserve_role", "costserve_role"),
    "jwt_leeway_seconds": ("5", 5.0),
    "reflection": ("off", "off"),
    "model_info": ("on", "on"),
    "metrics_tls_cert": ("/etc/costserve/tls/metrics.pem", Path("/etc/costserve/tls/metrics.pem")),
    "metrics_tls_key": ("/etc/costserve/tls/metrics.key", Path("/etc/costserve/tls/metrics.key")),
    "metrics_tls_client_ca": ("/etc/costserve/tls/scrapers-ca.pem", Path("/etc/costserve/tls/scrapers-ca.pem")),
    "metrics_basic_auth": ("/etc/costserve/metrics-users", Path("/etc/costserve/metrics-users")),
}


#: Fields valid only beside others (TLS's certificate and key): the companions each needs.
#: What each field needs beside it to be valid (TLS's certificate and key, JWT's issuer and audience, ...):
#: every companion, transitively, with a value that is valid for it.
COMPANION_VALUES = {
    "tls_cert": "/elsewhere/companion",
    "tls_key": "/elsewhere/companion",
    "tls_client_ca": "/elsewhere/companion",
    "tls_client_tenant": "common-name",
    "jwt_keys": "/elsewhere/companion",
    "jwt_issuer": "issuer",
    "jwt_audience": "audience",
    "metrics_tls_cert": "/elsewhere/companion",
    "metrics_tls_key": "/elsewhere/companion",
}


def _needed_by(name: str) -> set[str]:
    needed: set[str] = set()
    pending = [name]
    while pending:
        field = pending.pop()
        for dependent, other in COMPANIONS:
            if dependent == field and other not in needed and other != name:
                needed.add(other)
                pending.append(other)
    return needed


def _companions(name: str) -> dict[str, str]:
    """Environment variables setting the companions ``name`` needs (none for most fields)."""
    return {env_var(other): COMPANION_VALUES[other] for other in _needed_by(name)}


def _default_text(name: str) -> str:
    """A valid flag/env text for the field other than its sample: its default, or a path for unset ones."""
    default = Settings.model_fields[name].default
    if default is None:
        return "/elsewhere/file"
    return "another" if default == "" else str(default)  # an empty text would leave a companion unset


@pytest.fixture(autouse=True)
def _no_costserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the COSTSERVE_* variables they need; none leak in from the shell."""
    for variable in list(os.environ):
        if variable.upper().startswith("COSTSERVE_"):
            monkeypatch.delenv(variable)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costserve-server", exit_on_error=False)
    add_settings_arguments(parser)
    return parser


@pytest.fixture
def make_settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings as ``costserve-server serve`` builds them from flags and environment variables."""

    def make(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        for variable, value in (environ or {}).items():
            monkeypatch.setenv(variable, value)
        return settings_from_args(_parser().parse_args(argv or []))

    return make


def _problems(error: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return describe_problems(error.value)


def _names(name: str) -> str:
    return f"{flag(name)} ({env_var(name)})"


def test_samples_cover_every_field() -> None:
    assert set(SAMPLES) == set(FIELD_NAMES)
    defaults = Settings()
    for name, (_, parsed) in SAMPLES.items():
        assert getattr(defaults, name) != parsed, name


def test_every_field_is_documented_with_a_unit_or_meaning() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description and len(info.description) > 20, name


# --- defaults and copies ----------------------------------------------------------------


def test_defaults(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.metrics_port == 8000
    assert (settings.model_repository, settings.model_dir) == (Path("models"), None)
    assert settings.max_images_per_request <= settings.max_queue
    assert settings.max_batch_size >= 1
    assert settings.batch_timeout_ms >= 0
    assert settings.prices is None and settings.budgets is None and settings.ready_file is None


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_model_copy_changes_only_what_it_is_given() -> None:
    settings = Settings(port=0, max_batch_size=8)
    copy = settings.model_copy(update={"max_batch_size": 1})
    assert (copy.port, copy.max_batch_size) == (0, 1)
    assert settings.max_batch_size == 8
    assert copy.model_dump(exclude={"max_batch_size"}) == settings.model_dump(exclude={"max_batch_size"})


def test_direct_construction_takes_keywords_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTSERVE_PORT", "6001")
    monkeypatch.setenv("COSTSERVE_MAX_QUEUE", "500")
    settings = Settings(port=0, model_dir="m")
    assert (settings.port, settings.max_queue, settings.model_dir) == (0, 500, Path("m"))


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(max_batch=3)  # type: ignore[call-arg]


# --- every field has a flag and an environment variable --------------------------------


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_flag_and_env_var_names(name: str) -> None:
    assert flag(name) == "--" + name.replace("_", "-")
    assert env_var(name) == "COSTSERVE_" + name.upper()


def test_name_examples() -> None:
    assert (flag("max_batch_size"), env_var("max_batch_size")) == ("--max-batch-size", "COSTSERVE_MAX_BATCH_SIZE")
    assert env_var("batch_timeout_ms") == "COSTSERVE_BATCH_TIMEOUT_MS"


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_has_a_flag(name: str, make_settings: Callable[..., Settings]) -> None:
    text, parsed = SAMPLES[name]
    settings = make_settings([f"{flag(name)}={text}"], _companions(name))
    value = getattr(settings, name)
    assert value == parsed
    assert type(value) is type(parsed)
    others = {
        other: Settings.model_fields[other].default
        for other in FIELD_NAMES
        if other != name and other not in _needed_by(name)
    }
    assert {other: getattr(settings, other) for other in others} == others


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_has_an_env_var_converted_to_its_type(name: str, make_settings: Callable[..., Settings]) -> None:
    text, parsed = SAMPLES[name]
    settings = make_settings(environ={env_var(name): text, **_companions(name)})
    value = getattr(settings, name)
    assert value == parsed
    assert type(value) is type(parsed)


def test_help_lists_every_field_with_its_env_var_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100000")  # argparse wraps help at hyphens: keep each entry on one line
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name, info in Settings.model_fields.items():
        assert flag(name) in help_text, name
        documented = " ".join(str(info.description).split())
        assert f"{documented} [env {env_var(name)}, default {info.default}]" in help_text, name


def test_all_env_vars_at_once(make_settings: Callable[..., Settings]) -> None:
    environ = {env_var(name): text for name, (text, _) in SAMPLES.items()}
    settings = make_settings(environ=environ)
    assert settings == Settings(**{name: parsed for name, (_, parsed) in SAMPLES.items()})


def test_unrelated_env_vars_are_ignored(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(environ={"PORT": "1", "COSTSERVE_UNKNOWN": "x"}) == Settings()


def test_log_level_is_case_insensitive(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(["--log-level", "debug"]).log_level == "DEBUG"


# --- precedence -------------------------------------------------------------------------


def test_flag_beats_env_beats_default(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(["--port", "9000"], {"COSTSERVE_PORT": "7000", "COSTSERVE_MAX_QUEUE": "500"})
    assert settings.port == 9000  # flag over env
    assert settings.max_queue == 500  # env over default
    assert settings.metrics_port == 8000  # default


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_flag_beats_env_for_every_field(name: str, make_settings: Callable[..., Settings]) -> None:
    text, parsed = SAMPLES[name]
    settings = make_settings([f"{flag(name)}={text}"], {env_var(name): _default_text(name), **_companions(name)})
    assert getattr(settings, name) == parsed


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_env_beats_default_and_flag_beats_that_env_for_every_field(
    name: str, make_settings: Callable[..., Settings]
) -> None:
    text, parsed = SAMPLES[name]
    companions = _companions(name)
    assert getattr(make_settings(environ={env_var(name): text, **companions}), name) == parsed
    overridden = getattr(
        make_settings([f"{flag(name)}={_default_text(name)}"], {env_var(name): text, **companions}), name
    )
    assert overridden != parsed


def test_flag_equal_to_zero_still_beats_env(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        ["--cache-size", "0", "--port", "0"], {"COSTSERVE_CACHE_SIZE": "50", "COSTSERVE_PORT": "7"}
    )
    assert settings.cache_size == 0
    assert settings.port == 0


def test_a_bad_env_value_under_a_flag_is_not_used(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(["--port", "1"], {"COSTSERVE_PORT": "abc"}).port == 1


# --- validation on construction ---------------------------------------------------------

# Every constraint: (field, a value just past it, what the message says is allowed).
CONSTRAINTS: list[tuple[str, Any, str]] = [
    ("port", -1, "must be at least 0"),
    ("port", 65536, "must be at most 65535"),
    ("port", "abc", "must be a whole number"),
    ("metrics_port", -2, "must be at least -1"),
    ("metrics_port", 65536, "must be at most 65535"),
    ("model_dir", "", "must name a directory"),
    ("model_dir", ".", "must name a directory"),
    ("model_repository", ".", "must name a directory"),
    ("poll_seconds", -1, "must be at least 0"),
    ("max_images_per_request", 0, "must be at least 1"),
    ("max_message_bytes", 1023, "must be at least 1024"),
    ("max_image_pixels", -1, "must be at least 0"),
    ("max_request_pixels", -1, "must be at least 0"),
    ("decode_threads", 0, "must be at least 1"),
    ("max_decode_queue", -1, "must be at least 0"),
    ("max_concurrent_rpcs", 0, "must be at least 1"),
    ("max_pending_calls", 3, "must be at least 4"),
    ("max_streams_per_connection", 0, "must be at least 1"),
    ("max_batch_size", 0, "must be at least 1"),
    ("batch_timeout_ms", -0.1, "must be at least 0"),
    ("batch_timeout_ms", math.inf, "must be a finite number"),
    ("batch_timeout_ms", "soon", "must be a number"),
    ("batch_fill_timeout_ms", -1, "must be at least 0"),
    ("batch_fill_timeout_ms", math.nan, "must be a finite number"),
    ("max_queue", 0, "must be at least 1"),
    ("max_queue", 1.5, "must be a whole number"),
    ("cache_size", -1, "must be at least 0"),
    ("cache_size", "", "must be a whole number"),
    ("inference_threads", -1, "must be at least 0"),
    ("workers", "0", "must be a whole number, at least 1, or auto"),
    ("workers", "two", "must be a whole number, at least 1, or auto"),
    ("drain_grace_seconds", -1, "must be at least 0"),
    ("drain_seconds", -1, "must be at least 0"),
    ("drain_seconds", math.inf, "must be a finite number"),
    ("policy", "fast", "must be 'accuracy_first' or 'cost_first'"),
    ("latency_slo_ms", 0, "must be more than 0"),
    ("latency_slo_ms", math.inf, "must be a finite number"),
    ("over_slo", "drop", "must be 'queue' or 'refuse'"),
    ("log_level", "LOUD", "must be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), CONSTRAINTS)
def test_construction_validates_each_constraint(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{name: value})
    [problem] = _problems(caught)
    assert problem.startswith(f"{_names(name)}: {allowed}"), problem
    assert problem.endswith(f", got {value!r}" if value == "" else f", got {value}"), problem


def test_boundary_values_are_accepted() -> None:
    settings = Settings(
        max_batch_size=1, max_queue=1, max_images_per_request=1, cache_size=0, batch_timeout_ms=0,
        max_message_bytes=1024, port=65535, metrics_port=-1, max_pending_calls=4, inference_threads=0,
        drain_seconds=0, drain_grace_seconds=0, latency_slo_ms=0.001, max_decode_queue=0,
    )  # fmt: skip
    assert (settings.max_batch_size, settings.max_queue, settings.max_images_per_request) == (1, 1, 1)
    assert settings.batch_timeout_ms == 0.0
    assert (settings.port, settings.metrics_port) == (65535, -1)


def test_images_per_request_may_not_exceed_the_queue() -> None:
    assert Settings(max_images_per_request=10, max_queue=10).max_queue == 10
    with pytest.raises(ValidationError) as caught:
        Settings(max_images_per_request=11, max_queue=10)
    assert _problems(caught) == [
        f"{_names('max_images_per_request')}: must be at most {_names('max_queue')}, which is 10, got 11"
    ]


def test_cross_field_rule_applies_across_flag_and_env(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError) as caught:
        make_settings([], {"COSTSERVE_MAX_QUEUE": "10"})  # the default 64 images per request no longer fit
    assert _names("max_images_per_request") in _problems(caught)[0]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(max_batch_size=0, cache_size=-1, batch_timeout_ms=-1, policy="fast")
    problems = _problems(caught)
    assert len(problems) == 4
    for name in ("max_batch_size", "cache_size", "batch_timeout_ms", "policy"):
        assert any(problem.startswith(_names(name)) for problem in problems), name


# --- costserve-server serve: bad values exit 2 ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size (COSTSERVE_MAX_BATCH_SIZE): must be at least 1, got 0"),
        (["--port", "abc"], {}, "--port (COSTSERVE_PORT): must be a whole number, got abc"),
        (["--policy", "fast"], {}, "--policy (COSTSERVE_POLICY): must be 'accuracy_first' or 'cost_first', got fast"),
        ([], {"COSTSERVE_MAX_QUEUE": "lots"}, "--max-queue (COSTSERVE_MAX_QUEUE): must be a whole number, got lots"),
        ([], {"COSTSERVE_PORT": "abc"}, "--port (COSTSERVE_PORT): must be a whole number, got abc"),
        (["--model-dir", ""], {}, "--model-dir (COSTSERVE_MODEL_DIR): must name a directory"),
    ],
)
def test_bad_value_exits_2_naming_flag_and_env_var(
    argv: list[str],
    environ: dict[str, str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    model_dir = [] if "--model-dir" in argv else ["--model-dir", str(tmp_path / "models")]
    assert main(["serve", *model_dir, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"costserve-server: {expected}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "models").exists()  # refused before anything was trained or served


def test_every_bad_value_is_listed_on_its_own_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COSTSERVE_MAX_QUEUE", "lots")
    assert main(["serve", "--max-batch-size", "0", "--port", "abc", "--policy", "fast"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    for name in ("max_batch_size", "port", "policy", "max_queue"):
        assert any(line.startswith(f"costserve-server: {_names(name)}: ") for line in lines), name


# --- unknown COSTSERVE_* variables are warned about -------------------------------------


def test_unknown_env_vars_are_named_with_a_suggestion() -> None:
    environ = {"COSTSERVE_MAX_QEUE": "3", "COSTSERVE_PORT": "1", "COSTSERVE_TARGET": "h:1", "PATH": "/bin"}
    assert unknown_env_vars(environ) == [
        "COSTSERVE_MAX_QEUE names no setting and is ignored; did you mean COSTSERVE_MAX_QUEUE?"
    ]


def test_client_env_vars_are_not_warned_about() -> None:
    client = [
        "COSTSERVE_TARGET",
        "COSTSERVE_TENANT",
        "COSTSERVE_METRICS_URL",
        "COSTSERVE_PROMETHEUS",
        "COSTSERVE_WINDOW",
    ]
    assert unknown_env_vars(dict.fromkeys(client, "x")) == []


def test_serve_warns_about_unknown_env_vars(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COSTSERVE_BACH_SIZE", "4")
    assert main(["serve", "--max-batch-size", "0"]) == 2  # a bad flag, so that nothing is served
    err = capsys.readouterr().err
    assert "costserve-server: warning: COSTSERVE_BACH_SIZE names no setting" in err


# --- derived values ---------------------------------------------------------------------


@pytest.mark.parametrize(("ms", "seconds"), [(2.0, 0.002), (0.0, 0.0), (1500.0, 1.5), (0.5, 0.0005)])
def test_batch_timeout_s_converts_milliseconds_to_seconds(ms: float, seconds: float) -> None:
    assert Settings(batch_timeout_ms=ms).batch_timeout_s == pytest.approx(seconds)


def test_seconds_properties() -> None:
    settings = Settings(batch_fill_timeout_ms=30, latency_slo_ms=250)
    assert settings.batch_timeout_s == pytest.approx(settings.batch_timeout_ms / 1000)
    assert settings.batch_fill_timeout_s == pytest.approx(0.03)
    assert settings.latency_slo_s == pytest.approx(0.25)
