"""The README documents every flag, environment variable and metric the server has."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry

from conftest import REPO_ROOT
from costserve.server.metrics import ServiceMetrics
from costserve.server.settings import Settings, env_var

README = (REPO_ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    for settings_field in dataclasses.fields(Settings):
        flag = "--" + settings_field.name.replace("_", "-")
        assert f"`{flag}`" in README, f"{flag} is missing from README.md"
        assert f"`{env_var(settings_field.name)}`" in README, f"{env_var(settings_field.name)} is missing"


def test_every_metric_is_documented() -> None:
    registry = CollectorRegistry()
    ServiceMetrics(registry, process_collector=False)
    names = {metric.name for metric in registry.collect()}
    assert names
    for name in names:
        documented = name if name + "_total" not in README else name + "_total"
        assert f"`{documented}" in README, f"metric {name} is missing from README.md"


def test_quickstart_uses_the_two_commands() -> None:
    assert "make serve" in README and "make test" in README
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "\nserve:" in makefile and "\ntest:" in makefile
