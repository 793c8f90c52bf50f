"""The docs document every flag, environment variable and metric the server has, and their links resolve.

The README is short (what it is, the two commands, the client, links); the flags table is in
docs/configuration.md and the metrics table in docs/operations.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT
from prometheus_client import CollectorRegistry

from costserve.server.metrics import ServiceMetrics
from costserve.server.settings import Settings, env_var

README = (REPO_ROOT / "README.md").read_text()
CONFIGURATION = (REPO_ROOT / "docs" / "configuration.md").read_text()
OPERATIONS = (REPO_ROOT / "docs" / "operations.md").read_text()
#: The pages whose relative links must resolve.
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
#: Most lines the README may have: it is an entry point; the rest lives in docs/.
README_MAX_LINES = 160


def test_every_setting_is_in_the_configuration_table() -> None:
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert f"`{flag}`" in CONFIGURATION, f"{flag} is missing from docs/configuration.md"
        assert f"`{env_var(name)}`" in CONFIGURATION, f"{env_var(name)} is missing from docs/configuration.md"


def test_every_metric_is_documented() -> None:
    registry = CollectorRegistry()
    ServiceMetrics(registry, process_collector=False)
    names = {metric.name for metric in registry.collect()}
    assert names
    for name in names:
        documented = name if name + "_total" not in OPERATIONS else name + "_total"
        assert f"`{documented}" in OPERATIONS, f"metric {name} is missing from docs/operations.md"


def test_quickstart_uses_the_two_commands() -> None:
    assert "make serve" in README and "make test" in README
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "\nserve:" in makefile and "\ntest:" in makefile


def test_readme_is_short() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (move detail to docs/)"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (their brackets are not links)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page), flags=re.MULTILINE):
        slug = _slug(heading)
        suffix = 0
        while (slug if not suffix else f"{slug}-{suffix}") in anchors:
            suffix += 1
        anchors.add(slug if not suffix else f"{slug}-{suffix}")
    return anchors


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO_ROOT)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
