"""deploy/: Prometheus config, recording rules, Grafana dashboard and docker-compose.

The integration test starts the real Prometheus server (Debian package `prometheus`)
against a real costserve serving a repository of three models (digits, a copy of it
named twin, and broken, whose versions fail to load), loads deploy/prometheus/rules.yml
into it, drives traffic and evaluates every PromQL expression of the dashboard (once per
value of its $model variable in MODEL_SELECTIONS), of the recording rules and of the
alerts through Prometheus' HTTP API. Each result is compared with the same figure
computed in Python from the server's own registry.

Prometheus scrapes /metrics as deploy/prometheus/prometheus-tls.yml says: over HTTPS,
checking the server's certificate for the config's server_name against the test CA, with
basic auth (a users file made by add_user), and, beyond the deploy file, presenting a
client certificate to a server that asks for one (mTLS). Only the target, the files and
the intervals are the test's own.

How the comparison is made exact. Phase 1 of the traffic creates every series, then
Prometheus scrapes the idle server: sample at t1, values S1. Phase 2 adds traffic,
then Prometheus scrapes the idle server again: sample at t2, values S2. Every
expression is evaluated at t2 with its range set to t2 - t1 + 1 ms, so each series'
first sample in the range is at t1 and its last at t2. rate() and increase() then
scale S2 - S1 by a factor that `Window` reproduces from Prometheus' extrapolatedRate,
and histogram_quantile() is reproduced from promql/quantile.go.

Without the prometheus binary (or promtool, or PyYAML) a test skips, and fails when
CI=true.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from pki import Pki, make_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
#: The same, scraping a /metrics protected by TLS and basic auth.
PROMETHEUS_TLS_CONFIG = DEPLOY / "prometheus" / "prometheus-tls.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "costserve.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "costserve.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
PRICES = DEPLOY / "prices.toml"
BUDGETS = DEPLOY / "budgets.toml"
EXAMPLES = sorted((REPO_ROOT / "examples" / "digits").glob("digit_*.png"))

JOB = "costserve"
#: The only range selector rules.yml may use; the test substitutes its own window.
RULE_RANGE = "[1m]"
#: The only range selectors the dashboard may use (Grafana variables); substituted alike.
DASHBOARD_RANGES = ("[$__rate_interval]", "[$__range]")
#: The dashboard's model variable, and what Grafana puts in its place: All (its allValue),
#: one model, and two models picked (Grafana joins a multi-value pick as a regex).
MODEL_VARIABLE = "$model"
ALL_MODELS = ".*"
MODEL_SELECTIONS = (ALL_MODELS, "digits", "(twin|broken)")
#: The models of the test's repository: the session's digits model, a copy of it served
#: under another name, and a model whose versions fail to load.
DIGITS, TWIN, BROKEN = "digits", "twin", "broken"
ALERT = "CostserveModelLoadFailed"
#: Limit of every wait on Prometheus, in seconds.
WAIT_S = 30.0
#: Relative tolerance of a figure computed from the same counter values (float rounding only).
EXACT = 1e-9
#: histogram_quantile() interpolates, and newer Prometheus versions ignore relative bucket
#: differences below 1e-12: a little more room.
QUANTILE = 1e-6
#: Shortest window between the two scrapes, in seconds (see the provisioned-cost check).
MIN_WINDOW_S = 3.0

Key = tuple[str, frozenset]  # (sample name, labels)
Vector = dict[frozenset, float]  # labels -> value, as an instant vector
#: Series that change while the server idles. Their samples come from Prometheus, checked
#: to lie between the server's own readings taken just before and after the scrape.
DRIFTING = ("costserve_provisioned_cost_usd_total", "costserve_utilization", "costserve_event_loop_lag_seconds")
#: The cost profile's live figures: a batch size's series appears when a batch of that size first
#: runs, which depends on how the load happened to batch, so the test leaves them out.
LIVE_PROFILE = ("costserve_profile_cpu_seconds_per_image", "costserve_profile_seconds_per_image")


# --------------------------------------------------------------------------- tools


def _missing(what: str) -> None:
    """Fail under CI (CI=true), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: failing instead of skipping)")
    pytest.skip(what)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        _missing(f"`{name}` is not on PATH: install the Debian package `prometheus` (.ci/run does)")
    return found  # type: ignore[return-value]


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        _missing("PyYAML is not installed: `pip install pyyaml` (it belongs in the test extras)")
    return yaml


def _promtool(*args: str) -> str:
    result = subprocess.run([_tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _rule_count() -> int:
    """Recording rules in rules.yml, as promtool counts them."""
    output = _promtool("check", "rules", str(RULES))
    match = re.search(r"SUCCESS: (\d+) rules found", output)
    assert match, output
    return int(match.group(1))


def _rules_text() -> str:
    """rules.yml without its comments."""
    return "\n".join(line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#"))


def _ranges(expr: str) -> set[str]:
    return set(re.findall(r"\[[^\]]*\]", expr))


def _with_window(expr: str, window_ms: int, selectors: Iterable[str]) -> str:
    for selector in selectors:
        expr = expr.replace(selector, f"[{window_ms}ms]")
    return expr


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query in the dashboard."""
    return [
        (panel["title"], target)
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


# ----------------------------------------------------------- the expected figures


def _bucket_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' bucketQuantile (promql/quantile.go) over {upper bound: cumulative count}."""
    ordered = sorted(buckets.items())
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    counts: list[float] = []
    for _, count in ordered:  # ensureMonotonic
        counts.append(max(count, counts[-1]) if counts else count)
    if counts[-1] == 0:
        return math.nan
    rank = q * counts[-1]
    b = next((i for i in range(len(ordered) - 1) if counts[i] >= rank), len(ordered) - 1)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    if b == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    start, end, count = 0.0, ordered[b][0], counts[b]
    if b > 0:
        start = ordered[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


class Window:
    """What PromQL evaluates to at t2 over [t2 - (t2 - t1 + 1 ms), t2], from the series' values.

    ``before`` holds every series' value at t1 (its first sample in the range), ``after``
    its value at t2 (its last sample, at the evaluation time). Methods return vectors
    keyed by the ``by`` labels, like ``sum by (...)``, of the series whose labels pass ``match``
    (label=value, or label=predicate; a missing label is "").
    """

    def __init__(self, before: dict[Key, float], after: dict[Key, float], t1_ms: int, t2_ms: int) -> None:
        self.before, self.after = before, after
        self.t1_ms, self.t2_ms = t1_ms, t2_ms
        self.range_ms = t2_ms - t1_ms + 1

    def _series(self, name: str, match: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], float, float]]:
        for (sample, labels), last in self.after.items():
            labelled = dict(labels)
            if sample == name and all(
                test(labelled.get(label, "")) if callable(test) else labelled.get(label, "") == test
                for label, test in match.items()
            ):
                yield labelled, self.before[(sample, labels)], last

    def _increase(self, first: float, last: float) -> float:
        """increase() of one counter series: Prometheus' extrapolatedRate, isRate=false.

        The range starts 1 ms before the first sample (below the extrapolation threshold
        of 1.1 average scrape intervals, so extrapolated), unless the counter would reach
        zero sooner; it ends at the last sample.
        """
        delta = last - first
        sampled = (self.t2_ms - self.t1_ms) / 1000
        to_start = (self.range_ms - (self.t2_ms - self.t1_ms)) / 1000
        if delta > 0 and first >= 0:
            to_start = min(to_start, sampled * (first / delta))
        return delta * ((sampled + to_start) / sampled)

    @staticmethod
    def _group(labels: dict[str, str], by: Iterable[str]) -> frozenset:
        return frozenset((label, labels[label]) for label in by if label in labels)

    def increase(self, name: str, /, by: Iterable[str] = (), **match: Any) -> Vector:
        out: Vector = {}
        for labels, first, last in self._series(name, match):
            key = self._group(labels, by)
            out[key] = out.get(key, 0.0) + self._increase(first, last)
        return out

    def rate(self, name: str, /, by: Iterable[str] = (), **match: Any) -> Vector:
        return {key: value / (self.range_ms / 1000) for key, value in self.increase(name, by, **match).items()}

    def gauge(
        self, name: str, /, by: Iterable[str] = (), how: Callable[[list[float]], float] = sum, **match: Any
    ) -> Vector:
        groups: dict[frozenset, list[float]] = {}
        for labels, _, last in self._series(name, match):
            groups.setdefault(self._group(labels, by), []).append(last)
        return {key: how(values) for key, values in groups.items()}

    def quantile(self, q: float, histogram: str, by: Iterable[str] = (), **match: Any) -> Vector:
        """histogram_quantile(q, sum by (<by>, le) (rate(<histogram>_bucket{<match>}[...])))."""
        buckets: dict[frozenset, dict[float, float]] = {}
        for labels, first, last in self._series(histogram + "_bucket", match):
            group = buckets.setdefault(self._group(labels, by), {})
            bound = float(labels["le"])
            group[bound] = group.get(bound, 0.0) + self._increase(first, last) / (self.range_ms / 1000)
        return {key: _bucket_quantile(q, group) for key, group in buckets.items()}


def _div(a: Vector, b: Vector) -> Vector:
    """a / b, matching one-to-one on all labels as PromQL does."""
    out: Vector = {}
    for key in a.keys() & b.keys():
        if b[key]:
            out[key] = a[key] / b[key]
        else:
            out[key] = math.copysign(math.inf, a[key]) if a[key] else math.nan
    return out


def _add(a: Vector, b: Vector) -> Vector:
    return {key: a[key] + b[key] for key in a.keys() & b.keys()}


def _scale(factor: float, a: Vector) -> Vector:
    return {key: factor * value for key, value in a.items()}


def _not(value: str) -> Callable[[str], bool]:
    return lambda label: label != value


def _one_of(*values: str) -> Callable[[str], bool]:
    return lambda label: label in values


def _regex(pattern: str) -> Callable[[str], bool]:
    """A label matcher ``=~"<pattern>"``: Prometheus anchors the regex at both ends."""
    compiled = re.compile(pattern)
    return lambda label: compiled.fullmatch(label) is not None


def _positive(a: Vector) -> Vector:
    """``a > 0``: the series above 0."""
    return {key: value for key, value in a.items() if value > 0}


def _dashboard_expectations(w: Window, model: str = ALL_MODELS) -> dict[tuple[str, str], tuple[Vector, float]]:
    """(panel title, refId) -> (what the query must return with ``model`` for $model, relative tolerance)."""
    m = _regex(model)  # every per-model family is filtered by {model=~"$model"}, model_info by name
    cost, images = "costserve_cost_usd_total", "costserve_images_total"
    charged = w.rate(cost, resource=_one_of("cpu", "memory"), model=m)
    provisioned = w.rate("costserve_provisioned_cost_usd_total")
    vcpus = sum(w.gauge("costserve_provisioned", resource="vcpus").values()) or math.nan
    latency = "costserve_request_duration_seconds"
    predictions = {"code": "OK", "method": lambda method: method.startswith("Predict"), "model": m}
    return {
        ("Throughput", "A"): (w.rate("costserve_requests_total", ["precision"], **predictions), EXACT),
        ("Throughput", "B"): (w.rate(images, ["precision"], model=m), EXACT),
        ("Latency (p50 / p95 / p99)", "A"): (w.quantile(0.5, latency, model=m), QUANTILE),
        ("Latency (p50 / p95 / p99)", "B"): (w.quantile(0.95, latency, model=m), QUANTILE),
        ("Latency (p50 / p95 / p99)", "C"): (w.quantile(0.99, latency, model=m), QUANTILE),
        ("Batch size (avg, p95)", "A"): (
            _div(
                w.rate("costserve_batch_size_sum", ["precision"], model=m),
                w.rate("costserve_batch_size_count", ["precision"], model=m),
            ),
            EXACT,
        ),
        ("Batch size (avg, p95)", "B"): (w.quantile(0.95, "costserve_batch_size", ["precision"], model=m), QUANTILE),
        ("Queue depth", "A"): (w.gauge("costserve_queue_depth", ["precision"], model=m), EXACT),
        ("Queue wait and inference time (p95)", "A"): (
            w.quantile(0.95, "costserve_queue_duration_seconds", ["precision"], model=m),
            QUANTILE,
        ),
        ("Queue wait and inference time (p95)", "B"): (
            w.quantile(0.95, "costserve_inference_duration_seconds", ["precision"], model=m),
            QUANTILE,
        ),
        ("Queue wait and inference time (p95)", "C"): (w.gauge("costserve_event_loop_lag_seconds", how=max), EXACT),
        ("Cache hit ratio", "A"): (
            _div(
                w.rate("costserve_cache_hits_total"),
                _add(w.rate("costserve_cache_hits_total"), w.rate("costserve_cache_misses_total")),
            ),
            EXACT,
        ),
        ("Cache hit ratio", "B"): (
            _div(w.rate(images, ["precision"], cache="hit", model=m), w.rate(images, ["precision"], model=m)),
            EXACT,
        ),
        ("Cache entries, bytes and evictions", "A"): (w.gauge("costserve_cache_entries"), EXACT),
        ("Cache entries, bytes and evictions", "B"): (w.rate("costserve_cache_evictions_total"), EXACT),
        ("Cache entries, bytes and evictions", "C"): (w.gauge("costserve_cache_bytes"), EXACT),
        ("Rejections and errors", "A"): (w.rate("costserve_rejected_total", ["reason"]), EXACT),
        ("Rejections and errors", "B"): (
            w.rate("costserve_requests_total", ["code"], code=_not("OK"), model=m),
            EXACT,
        ),
        ("Cost per 1,000 predictions", "A"): (
            _scale(1000, _div(w.rate(cost, ["precision"], model=m), w.rate(images, ["precision"], model=m))),
            EXACT,
        ),
        ("Cost per 1,000 predictions", "B"): (
            _scale(1000, _div(w.rate(cost, model=m), w.rate(images, model=m))),
            EXACT,
        ),
        ("Cost per request (mean, p95)", "A"): (
            _div(
                w.rate("costserve_request_cost_usd_sum", ["precision"], model=m),
                w.rate("costserve_request_cost_usd_count", ["precision"], model=m),
            ),
            EXACT,
        ),
        ("Cost per request (mean, p95)", "B"): (
            w.quantile(0.95, "costserve_request_cost_usd", ["precision"], model=m),
            QUANTILE,
        ),
        ("Cost rate by resource (USD/hour)", "A"): (_scale(3600, w.rate(cost, ["resource"], model=m)), EXACT),
        ("Cost split by resource (time range)", "A"): (w.increase(cost, ["resource"], model=m), EXACT),
        ("Prices in force", "A"): (w.gauge("costserve_price_usd", ["resource"], how=max), EXACT),
        ("Utilization", "A"): (w.gauge("costserve_utilization", ["instance"], how=max), EXACT),
        ("Utilization", "B"): (
            _scale(1 / vcpus, w.rate("costserve_cpu_seconds_total", ["phase"], model=m)),
            EXACT,
        ),
        ("Provisioned vs charged cost (USD/hour)", "A"): (_scale(3600, provisioned), EXACT),
        ("Provisioned vs charged cost (USD/hour)", "B"): (_scale(3600, charged), EXACT),
        ("Share of provisioned cost charged", "A"): (_div(charged, provisioned), EXACT),
        ("Network moved", "A"): (w.rate("costserve_network_bytes_total", ["precision"], model=m), EXACT),
        ("Model versions served", "A"): (
            w.gauge("costserve_model_info", ["name", "version", "precision", "format", "accuracy"], how=max, name=m),
            EXACT,
        ),
        ("Policy decisions", "A"): (w.rate("costserve_decisions_total", ["precision", "reason"], model=m), EXACT),
        ("Policy decisions", "B"): (w.gauge("costserve_load_shedding", how=max), EXACT),
        ("Spend by tenant (USD/hour)", "A"): (
            _scale(3600, w.rate("costserve_tenant_spend_usd_total", ["tenant"])),
            EXACT,
        ),
        ("Spend by tenant (USD/hour)", "B"): (w.rate("costserve_budget_rejections_total", ["tenant"]), EXACT),
        ("Tenant budgets", "A"): (w.gauge("costserve_tenant_budget_usd", ["tenant", "period"], how=max), EXACT),
        ("Throughput by model", "A"): (w.rate("costserve_requests_total", ["model"], **predictions), EXACT),
        ("Throughput by model", "B"): (w.rate(images, ["model"], model=m), EXACT),
        ("Latency p95 by model", "A"): (w.quantile(0.95, latency, ["model"], model=m), QUANTILE),
        ("Cost per 1,000 predictions by model", "A"): (
            _scale(1000, _div(w.rate(cost, ["model"], model=m), w.rate(images, ["model"], model=m))),
            EXACT,
        ),
        ("Model versions by state", "A"): (w.gauge("costserve_model_versions", ["model", "state"], model=m), EXACT),
        ("Model load failures (time range)", "A"): (
            w.increase("costserve_model_load_failures_total", ["model"], model=m),
            EXACT,
        ),
    }


def _rule_expectations(w: Window) -> dict[str, tuple[Vector, float]]:
    """Recording rule -> (what its expression must return, relative tolerance)."""
    cost, images = "costserve_cost_usd_total", "costserve_images_total"
    provisioned = "costserve_provisioned_cost_usd_total"
    job, job_precision = ["job"], ["job", "precision"]
    return {
        "job_precision:costserve_predictions:rate1m": (w.rate(images, job_precision), EXACT),
        "job_precision:costserve_cost_usd:rate1m": (w.rate(cost, job_precision), EXACT),
        "job_resource:costserve_cost_usd:rate1m": (w.rate(cost, ["job", "resource"]), EXACT),
        "job_precision:costserve_cost_per_1k_predictions_usd:ratio_rate1m": (
            _scale(1000, _div(w.rate(cost, job_precision), w.rate(images, job_precision))),
            EXACT,
        ),
        "job:costserve_cost_per_1k_predictions_usd:ratio_rate1m": (
            _scale(1000, _div(w.rate(cost, job), w.rate(images, job))),
            EXACT,
        ),
        "job_precision:costserve_request_cost_usd:mean_rate1m": (
            _div(
                w.rate("costserve_request_cost_usd_sum", job_precision),
                w.rate("costserve_request_cost_usd_count", job_precision),
            ),
            EXACT,
        ),
        "job:costserve_provisioned_cost_usd:rate1m": (w.rate(provisioned, job), EXACT),
        "job:costserve_cost_recovered:ratio_rate1m": (
            _div(w.rate(cost, job, resource=_one_of("cpu", "memory")), w.rate(provisioned, job)),
            EXACT,
        ),
        "job:costserve_cpu_utilization:ratio_rate1m": (
            _div(w.rate("costserve_cpu_seconds_total", job), w.gauge("costserve_provisioned", job, resource="vcpus")),
            EXACT,
        ),
    }


def _alert_expectations(w: Window) -> dict[str, tuple[Vector, float]]:
    """Alerting rule -> (what its expression must return, relative tolerance)."""
    failed = w.gauge("costserve_model_versions", ["job", "model"], how=max, state="failed")
    return {ALERT: (_positive(failed), EXACT)}


def _an_empty_window() -> Window:
    return Window({}, {}, 0, 1)


def _assert_matches(what: str, got: Vector, expected: Vector, rel: float, may_be_empty: bool = False) -> None:
    """``got`` has the series of ``expected``, with its values; it is empty only when ``may_be_empty``."""
    assert got or (may_be_empty and not expected), f"{what}: empty result"
    assert got.keys() == expected.keys(), (
        f"{what}: series {sorted(str(dict(k)) for k in got)}, expected {sorted(str(dict(k)) for k in expected)}"
    )
    for key, value in expected.items():
        assert math.isfinite(got[key]), f"{what} {dict(key)}: {got[key]} is not a finite number"
        assert got[key] == pytest.approx(value, rel=rel, abs=0.0), (
            f"{what} {dict(key)}: Prometheus says {got[key]!r}, the server's figures {value!r}"
        )


# ---------------------------------------------------------------------- prometheus


class Prometheus:
    """/usr/bin/prometheus on 127.0.0.1 port 0.

    Prometheus accepts port 0; the port it bound is read from its log line
    `msg="Listening on" address=127.0.0.1:NNNNN`, so no port is probed or reserved.
    """

    def __init__(self, binary: str, config: Path, data: Path) -> None:
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                "--web.listen-address=127.0.0.1:0",
                "--log.level=info",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self.bound = threading.Event()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)
            if match := re.search(r'msg="Listening on".*\baddress=\S*:(\d+)', line):
                self.port = int(match.group(1))
                self.bound.set()

    @property
    def log(self) -> str:
        return "".join(self.lines[-60:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.bound.wait(0.1):
            assert self.process.poll() is None, f"prometheus exited ({self.process.returncode}):\n{self.log}"
            assert time.monotonic() < deadline, f"prometheus never logged its address:\n{self.log}"
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:  # URLError included
                pass
            assert self.process.poll() is None, f"prometheus exited ({self.process.returncode}):\n{self.log}"
            assert time.monotonic() < deadline, f"prometheus never became ready:\n{self.log}"
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: its `data`; an error or a warning fails the test."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        assert body.get("status") == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        assert not body.get("warnings"), f"{path} {params}: warnings {body['warnings']}"
        return body["data"]

    def query(self, expr: str, at_ms: int | None = None) -> list[dict[str, Any]]:
        """An instant query (at ``at_ms``, or now): a list of {metric, value}."""
        params = {"query": expr}
        if at_ms is not None:
            params["time"] = f"{at_ms / 1000:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{expr}: a {data['resultType']} result"
        return data["result"]

    def values(self, expr: str, at_ms: int | None = None) -> Vector:
        """An instant query as {labels without __name__: value}."""
        return {
            frozenset((k, v) for k, v in item["metric"].items() if k != "__name__"): float(item["value"][1])
            for item in self.query(expr, at_ms)
        }

    def wait(self, condition: Callable[[], Any], what: str) -> Any:
        """Poll ``condition`` until it returns something true, for at most WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while True:
            result = condition()
            if result:
                return result
            assert self.process.poll() is None, f"prometheus exited while waiting for {what}:\n{self.log}"
            assert time.monotonic() < deadline, f"gave up after {WAIT_S:.0f} s waiting for {what}"
            time.sleep(0.2)

    def scrape_after(self, expected: dict[Key, float], not_before_s: float) -> int:
        """Timestamp (ms) of a scrape that started after ``not_before_s`` and saw exactly ``expected``."""
        not_before_ms = math.ceil(not_before_s * 1000)
        differences: list[str] = []

        def scraped() -> int | None:
            (up,) = self.query(f'timestamp(up{{job="{JOB}"}})')
            at = round(float(up["value"][1]) * 1000)
            if at < not_before_ms:
                return None
            seen: dict[Key, float] = {}
            for item in self.query('{__name__=~"costserve_.+"}', at):
                labels = dict(item["metric"])
                seen[(labels.pop("__name__"), frozenset(labels.items()))] = float(item["value"][1])
            differences[:] = [
                f"{key[0]}{dict(key[1])}: {seen.get(key)} != {value}"
                for key, value in expected.items()
                if seen.get(key) != value
            ]
            return None if differences else at

        try:
            return self.wait(scraped, "a scrape showing the server's values")
        except AssertionError as error:
            raise AssertionError(f"{error}; differences: {differences[:10]}") from None

    def _rules(self, kind: str) -> list[dict[str, Any]]:
        groups = self.api("rules", type=kind)["groups"]
        assert all(Path(group["file"]).resolve() == RULES.resolve() for group in groups), groups
        return [rule for group in groups for rule in group["rules"]]

    def recording_rules(self) -> list[dict[str, Any]]:
        return self._rules("record")

    def alerting_rules(self) -> list[dict[str, Any]]:
        """Each alerting rule, with its ``state`` and its ``alerts`` (labels, state, value)."""
        return self._rules("alert")

    def firing(self, alertname: str) -> set[frozenset]:
        """The labels of each firing alert of ``alertname``, without alertname and the rule's own labels."""
        (rule,) = [rule for rule in self.alerting_rules() if rule["name"] == alertname]
        return {
            frozenset((k, v) for k, v in alert["labels"].items() if k != "alertname" and k not in rule["labels"])
            for alert in rule["alerts"]
            if alert["state"] == "firing"
        }

    def rules_recorded(self, after_ms: int, count: int) -> bool:
        """All ``count`` rules loaded, healthy, and each recorded a finite value after ``after_ms``."""
        rules = self.recording_rules()
        if len(rules) != count or any(rule["health"] != "ok" for rule in rules):
            return False
        for rule in rules:
            stamps = self.query(f"timestamp({rule['name']})")
            if not stamps or any(float(s["value"][1]) * 1000 < after_ms for s in stamps):
                return False
            if not all(math.isfinite(value) for value in self.values(rule["name"]).values()):
                return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


# ---------------------------------------------------------------- server, traffic


def _snapshot(server: Any, target_labels: Mapping[str, str]) -> dict[Key, float]:
    """Every costserve_ sample of the server's registry (but DRIFTING and LIVE_PROFILE), with the target's labels.

    Labels with an empty value are left out, as Prometheus stores them (model="": calls refused
    before a model was resolved).
    """
    samples: dict[Key, float] = {}
    for family in server.registry.collect():
        for sample in family.samples:
            name = sample.name
            if name in LIVE_PROFILE and sample.labels.get("source") == "live":
                continue
            if name.startswith("costserve_") and not name.endswith("_created") and name not in DRIFTING:
                labels = {label: value for label, value in sample.labels.items() if value}
                samples[(name, frozenset({**labels, **target_labels}.items()))] = sample.value
    return samples


def _publish_broken_version(model_dir: Path, version: str) -> None:
    """A version whose metadata.json cannot be read, published as writers do (built aside, then renamed)."""
    staging = model_dir / f".{version}-staging"
    staging.mkdir(parents=True)
    (staging / "metadata.json").write_text("{}\n")
    staging.rename(model_dir / version)


def _repository(model_dir: Path, root: Path) -> Path:
    """digits (the session's model, served preloaded), twin (a copy of it) and broken (version 1 fails to load)."""
    from costserve.server.repository.store import latest_version_dir

    version_dir = latest_version_dir(model_dir)
    assert version_dir is not None
    for name in (DIGITS, TWIN):
        shutil.copytree(version_dir, root / name / version_dir.name)
    _publish_broken_version(root / BROKEN, "1")
    return root


def _random_images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(count)]


def _every_series(client: Any, rng: np.random.Generator) -> None:
    """Traffic that touches every label set the test uses (run in both phases)."""
    for precision in ("fp32", "int8"):
        client.predict(EXAMPLES[:3], precision=precision)  # cache misses the first time, hits after
        client.predict(EXAMPLES[:3], precision=precision)  # cache hits
        client.predict(_random_images(rng, 2), precision=precision)  # new pixels: misses
        client.predict(_random_images(rng, 8), precision=precision, skip_cache=True)  # computed, batched
        list(client.predict_stream([[EXAMPLES[3]], _random_images(rng, 1)], precision=precision))
        with pytest.raises(grpc.RpcError) as refused:
            client.predict([b"not an image"], precision=precision)  # counted under model ""
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The second model: its own batchers and series; misses, then hits.
        client.predict(EXAMPLES[5:7], precision=precision, model=TWIN)
        client.predict(EXAMPLES[5:7], precision=precision, model=TWIN)
        client.predict(_random_images(rng, 3), precision=precision, model=TWIN, skip_cache=True)
    client.predict([EXAMPLES[4]])  # precision auto: the server chooses
    with pytest.raises(grpc.RpcError) as unknown:
        client.predict([EXAMPLES[4]], model=BROKEN)  # no version of it could be loaded
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert [model.name for model in client.list_models().models] == sorted([BROKEN, DIGITS, TWIN])


def _load(client: Any, rng: np.random.Generator) -> None:
    """Concurrent multi-image requests on both precisions, so that batches form."""
    work = [(_random_images(rng, 4), ("fp32", "int8")[i % 2]) for i in range(32)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(client.predict, images, precision=p, skip_cache=True) for images, p in work]
        for future in futures:
            future.result(timeout=60)


# -------------------------------------------------------------------- static tests


@pytest.mark.parametrize("config", [PROMETHEUS_CONFIG, PROMETHEUS_TLS_CONFIG], ids=lambda path: path.name)
def test_prometheus_config_and_rules_pass_promtool(config: Path) -> None:
    output = _promtool("check", "config", str(config))
    assert "is valid prometheus config file syntax" in output
    assert "SUCCESS: 1 rule files found" in output, f"{config.name} must load rules.yml"
    empty = _an_empty_window()
    rules = len(_rule_expectations(empty)) + len(_alert_expectations(empty))
    assert _rule_count() == rules, "a rule was added: add its expectation"
    assert _ranges(_rules_text()) == {RULE_RANGE}, f"every range selector in rules.yml must be {RULE_RANGE}"


def test_the_tls_config_is_the_plain_one_scraping_https_with_basic_auth() -> None:
    yaml = _yaml()
    plain, protected = (yaml.safe_load(path.read_text()) for path in (PROMETHEUS_CONFIG, PROMETHEUS_TLS_CONFIG))
    assert {key: value for key, value in protected.items() if key != "scrape_configs"} == {
        key: value for key, value in plain.items() if key != "scrape_configs"
    }
    (plain_job,), (job,) = plain["scrape_configs"], protected["scrape_configs"]
    extra = {"scheme", "tls_config", "basic_auth"}
    assert {key: value for key, value in job.items() if key not in extra} == plain_job
    assert job["scheme"] == "https"
    assert set(job["tls_config"]) == {"ca_file", "server_name"}, "mTLS files stay commented out: promtool needs them"
    # The password from a file, never in the config itself.
    assert set(job["basic_auth"]) == {"username", "password_file"}


def _deploy_tls_job() -> dict[str, Any]:
    """The scrape job of deploy/prometheus/prometheus-tls.yml."""
    (job,) = _yaml().safe_load(PROMETHEUS_TLS_CONFIG.read_text())["scrape_configs"]
    return job


def _scrape_config(pki: Pki, metrics_port: int, password_file: Path) -> dict[str, Any]:
    """The deploy file's job with the test's target, CA and password file, and a client certificate (mTLS).

    Its scheme, path, server_name and username are the deploy file's.
    """
    job = _deploy_tls_job()
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    job["tls_config"]["ca_file"] = str(pki.ca.cert)
    # What the deploy file's comment says to uncomment for mTLS.
    job["tls_config"].update(cert_file=str(pki.client.cert), key_file=str(pki.client.key))
    job["basic_auth"]["password_file"] = str(password_file)
    return job


def test_model_load_alert_fires_per_model_while_a_version_is_failed(tmp_path: Path) -> None:
    """promtool's unit test of the alert: one alert per (job, model), the most failed versions of any
    instance, gone once the version is fixed or removed; none for models whose versions all load."""

    def versions(instance: str, model: str, values: str) -> dict[str, str]:
        labels = f'job="{JOB}",instance="{instance}",model="{model}",state="failed"'
        return {"series": f"costserve_model_versions{{{labels}}}", "values": values}

    def fires(model: str, failed: int) -> dict[str, Any]:
        return {
            "exp_labels": {"severity": "warning", "job": JOB, "model": model},
            "exp_annotations": {
                "summary": f"costserve model {model}: {failed} version(s) failed to load",
                "description": "Those versions are not served (a version serving before keeps serving). "
                "The reason is in `costserve models` (the ListModels RPC) and the server's log; a failed "
                "version is tried again when its metadata.json changes.",
            },
        }

    tests = tmp_path / "rules_test.yml"
    # JSON is YAML. Samples every 15 s: digits fails on one instance at 30 s, on the other
    # (two versions) at 45 s, and is fixed everywhere at 75 s; shapes never fails.
    tests.write_text(
        json.dumps(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "15s",
                "tests": [
                    {
                        "interval": "15s",
                        "input_series": [
                            versions("a:8000", "digits", "0 0 1 1 1 0 0"),
                            versions("b:8000", "digits", "0 0 0 2 2 0 0"),
                            versions("a:8000", "shapes", "0 0 0 0 0 0 0"),
                        ],
                        "alert_rule_test": [
                            {"eval_time": "15s", "alertname": ALERT, "exp_alerts": []},
                            {"eval_time": "30s", "alertname": ALERT, "exp_alerts": [fires("digits", 1)]},
                            {"eval_time": "60s", "alertname": ALERT, "exp_alerts": [fires("digits", 2)]},
                            {"eval_time": "75s", "alertname": ALERT, "exp_alerts": []},
                        ],
                    }
                ],
            }
        )
    )
    assert "SUCCESS" in _promtool("test", "rules", str(tests))


def _model_labels(metrics: Any) -> dict[str, str]:
    """Family name (without _total) -> the label naming the model, for every family that has one."""
    from prometheus_client.metrics import MetricWrapperBase

    from costserve.server.metrics import LoopFamily

    out: dict[str, str] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, LoopFamily):
            name, labels = metric.name.removesuffix("_total"), metric.labelnames
        elif isinstance(metric, MetricWrapperBase):
            name, labels = metric._name, metric._labelnames  # prometheus_client keeps them private
        else:
            continue
        label = next((label for label in ("model", "name") if label in labels), None)
        if label:
            out[name] = label
    return out


def test_dashboard_and_rules_query_only_exported_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from costserve.server.metrics import ServiceMetrics

    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, process_collector=False)
    metrics.track_cost(lambda: 0.0, lambda: 0.0)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    families = {family.name: {family.name + s for s in suffixes[family.type]} for family in registry.collect()}
    exported = set().union(*families.values())

    targets = _dashboard_targets()
    used: set[str] = set()
    for expr in [target["expr"] for _, target in targets] + [_rules_text()]:
        names = set(re.findall(r"(?<![\w:])costserve_\w+", expr))  # not the recorded job...:costserve_... names
        assert names <= exported, f"{expr}: {sorted(names - exported)} are not exported by the server"
        used |= names
    unused = sorted(family for family, names in families.items() if not names & used)
    assert not unused, f"exported, but on no panel and in no rule: {unused}"

    # Every series of a per-model family is picked by the dashboard's $model.
    model_label = {sample: label for family, label in _model_labels(metrics).items() for sample in families[family]}
    assert model_label["costserve_requests_total"] == "model" and model_label["costserve_model_info"] == "name"
    for title, target in targets:
        assert _ranges(target["expr"]) <= set(DASHBOARD_RANGES), f"{title}: use [$__rate_interval] or [$__range]"
        leftover = target["expr"]
        for variable in ("$__rate_interval", "$__range", MODEL_VARIABLE):
            leftover = leftover.replace(variable, "")
        assert "$" not in leftover, f"{title}: {target['expr']} uses a variable the test does not substitute"
        for name, selector in re.findall(r"(?<![\w:])(costserve_\w+)(\{[^}]*\})?", target["expr"]):
            if name in model_label:
                matcher = f'{model_label[name]}=~"{MODEL_VARIABLE}"'
                assert matcher in selector, f"{title}: {target['expr']}: select {name} by {matcher}"


def test_dashboard_model() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    # $model: the models Prometheus knows, several at once, All meaning every series (model="" too).
    model = variables[MODEL_VARIABLE.removeprefix("$")]
    assert model["type"] == "query" and model["datasource"] == datasource
    assert model["definition"] == model["query"]["query"] == "label_values(costserve_model_versions, model)"
    assert model["multi"] and model["includeAll"] and model["allValue"] == ALL_MODELS
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in _panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        columns, rows = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        mine = {(x, y) for x in columns for y in rows}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == datasource, panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["datasource"] == datasource and t["expr"] for t in panel["targets"]), panel["title"]

    # What the issue asks the dashboard to show.
    exprs = " ".join(target["expr"] for _, target in _dashboard_targets())
    picked = '{model=~"$model"'
    for needle in [
        # throughput of predictions, every protocol
        'rate(costserve_requests_total{model=~"$model",code="OK",method=~"Predict.*|ModelInfer"}',
        f"rate(costserve_images_total{picked}",
        f"histogram_quantile(0.5, sum by (le) (rate(costserve_request_duration_seconds_bucket{picked}",
        f"histogram_quantile(0.95, sum by (le) (rate(costserve_request_duration_seconds_bucket{picked}",
        f"histogram_quantile(0.99, sum by (le) (rate(costserve_request_duration_seconds_bucket{picked}",
        f"rate(costserve_batch_size_sum{picked}",
        f"rate(costserve_batch_size_bucket{picked}",
        f"costserve_queue_depth{picked}",
        "rate(costserve_cache_hits_total",
        "costserve_cache_bytes",
        "rate(costserve_rejected_total",
        f"1000 * sum by (precision) (rate(costserve_cost_usd_total{picked}",  # cost per 1,000 predictions
        f"1000 * sum by (model) (rate(costserve_cost_usd_total{picked}",  # ... by model
        f"sum by (resource) (rate(costserve_cost_usd_total{picked}",  # split by resource
        "costserve_utilization",
        "rate(costserve_provisioned_cost_usd_total",  # provisioned vs charged
        f"sum by (model) (rate(costserve_requests_total{picked}",  # throughput by model
        f"sum by (model, state) (costserve_model_versions{picked}",  # versions by state
        f"sum by (model) (increase(costserve_model_load_failures_total{picked}",  # load failures
        'costserve_model_info{name=~"$model"}',
    ]:
        assert needle in exprs, f"no panel queries {needle}"

    queries = [(title, target["refId"]) for title, target in _dashboard_targets()]
    assert len(queries) == len(set(queries)), "two queries of a panel share a refId"
    assert set(queries) == set(_dashboard_expectations(_an_empty_window())), (
        "a query was added, removed or renamed: update _dashboard_expectations"
    )


def test_compose_and_grafana_provisioning_fit_together() -> None:
    yaml = _yaml()
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"costserve", "prometheus", "grafana"}

    # costserve is built from the repository's Dockerfile.
    build = services["costserve"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / build.get("dockerfile", "Dockerfile")).is_file()
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")

    # Pinned images, ports on the loopback interface only, mounted files that exist.
    mounts: dict[str, dict[str, Path]] = {}
    for name, service in services.items():
        if "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin an exact version, not {service['image']}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish {port} on 127.0.0.1 only"
        mounts[name] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
                mounts[name][target] = (COMPOSE.parent / source).resolve()
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared volume {source}"

    def mounted(service: str, path: str) -> Path:
        assert path in mounts[service], f"{service}: nothing is mounted at {path} ({sorted(mounts[service])})"
        return mounts[service][path]

    # costserve reads deploy/prices.toml.
    assert mounted("costserve", services["costserve"]["environment"]["COSTSERVE_PRICES"]) == PRICES.resolve()

    # Prometheus: this config and its rules side by side (rule_files is relative to the config).
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert mounted("prometheus", "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG.resolve()
    assert config["rule_files"] == ["rules.yml"]
    assert mounted("prometheus", "/etc/prometheus/rules.yml") == RULES.resolve()
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    (static,) = job["static_configs"]
    assert static["targets"] == ["costserve:8000"], "scrape the compose service on the image's metrics port"
    assert "127.0.0.1:8000:8000" in services["costserve"]["ports"]

    # Grafana: the data source is the compose Prometheus, at its scrape interval ...
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    assert mounted("grafana", "/etc/grafana/provisioning/datasources") == GRAFANA_DATASOURCES.parent.resolve()
    assert mounted("grafana", "/etc/grafana/provisioning/dashboards") == GRAFANA_DASHBOARD_PROVIDERS.parent.resolve()
    # ... and the dashboard provider reads the directory the dashboard JSON is mounted at.
    (provider,) = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert mounted("grafana", provider["options"]["path"]) == DASHBOARD.parent.resolve()
    home = Path(services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounted("grafana", str(home.parent)) / home.name == DASHBOARD.resolve()


# --------------------------------------------------------------- integration test


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The prometheus executable; looked up before the (session) model is trained."""
    return _tool("prometheus")


@pytest.mark.slow
def test_prometheus_evaluates_every_dashboard_and_rule_query_to_the_servers_figures(
    prometheus_binary: str, start_server: Callable[..., Any], model_dir: Path, tmp_path: Path
) -> None:
    from costserve import Client
    from costserve.server.metrics_auth import add_user

    rule_count = _rule_count()
    repository = _repository(model_dir, tmp_path / "models")
    # /metrics over TLS for the deploy config's server_name, asking for a client certificate and basic auth.
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    deploy_job = _deploy_tls_job()
    # Only the deploy file's server_name (no IP address): the scrape works only if Prometheus checks that name.
    served = pki.authority.issue("metrics", names=[x509.DNSName(deploy_job["tls_config"]["server_name"])])
    users, password_file = tmp_path / "metrics-users", tmp_path / "metrics-password"
    password_file.write_text(add_user(users, deploy_job["basic_auth"]["username"]))
    # poll_seconds=0: the repository is read at start-up and when the test says so.
    server = start_server(
        prices=PRICES,
        budgets=BUDGETS,
        model_dir=None,
        model_repository=repository,
        poll_seconds=0,
        metrics_tls_cert=served.cert,
        metrics_tls_key=served.key,
        metrics_tls_client_ca=pki.ca.cert,
        metrics_basic_auth=users,
    )
    target = {"job": JOB, "instance": f"127.0.0.1:{server.server.metrics_port}"}
    config = tmp_path / "prometheus.yml"
    # JSON is YAML. The very rules file of deploy/, evaluated every second.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [_scrape_config(pki, server.server.metrics_port, password_file)],
            }
        )
    )
    prometheus = Prometheus(prometheus_binary, config, tmp_path / "data")
    try:
        prometheus.wait_ready()
        prometheus.wait(
            lambda: prometheus.values(f'up{{job="{JOB}"}}') == {frozenset(target.items()): 1.0}, "the target to be up"
        )
        (scraped,) = prometheus.api("targets", state="active")["activeTargets"]
        assert scraped["scrapeUrl"] == f"https://{target['instance']}/metrics", scraped
        assert scraped["health"] == "up" and not scraped["lastError"], scraped
        rng = np.random.default_rng(7)
        with Client(server.target, timeout=30) as client:
            _every_series(client, rng)  # phase 1
            before = _snapshot(server, target)
            t1 = prometheus.scrape_after(before, time.time())

            _every_series(client, rng)  # phase 2
            _load(client, rng)
            _publish_broken_version(repository / BROKEN, "2")  # a second failure, in the window
            assert server.run(server.server.repository.reconcile())
            after = _snapshot(server, target)
            assert after.keys() == before.keys(), "phase 2 made series phase 1 did not: extend _every_series"
            # Idle from here on: the provisioned cost only grows, the utilization only falls.
            provisioned_low = server.metric("costserve_provisioned_cost_usd_total")
            utilization_high = server.metric("costserve_utilization")
            t2 = prometheus.scrape_after(after, max(time.time(), t1 / 1000 + MIN_WINDOW_S))
            provisioned_high = server.metric("costserve_provisioned_cost_usd_total")
            utilization_low = server.metric("costserve_utilization")

        # The drifting series: Prometheus' samples, bracketed by the server's readings.
        for name, low, high in [
            ("costserve_provisioned_cost_usd_total", provisioned_low, provisioned_high),
            ("costserve_utilization", utilization_low, utilization_high),
        ]:
            for snapshot, at in ((before, t1), (after, t2)):
                ((labels, value),) = prometheus.values(name, at).items()
                snapshot[(name, labels)] = value
            value = after[(name, frozenset(target.items()))]
            assert low <= value <= high, f"{name} at t2: Prometheus {value}, the server between {low} and {high}"
        # The loop lag moves every few ms with no direction to bracket it by: Prometheus' samples.
        for snapshot, at in ((before, t1), (after, t2)):
            ((labels, value),) = prometheus.values("costserve_event_loop_lag_seconds", at).items()
            snapshot[("costserve_event_loop_lag_seconds", labels)] = value
            assert 0 <= value < 1.0, f"event loop lag {value} s"
        # The provisioned cost grows at the rate of the prices and resources the server reports.
        # Each scrape stamps its start but reads the value a few ms later; 5% covers that jitter.
        key = ("costserve_provisioned_cost_usd_total", frozenset(target.items()))
        per_second = (
            server.metric("costserve_provisioned", {"resource": "vcpus"})
            * server.metric("costserve_price_usd", {"resource": "cpu"})
            + server.metric("costserve_provisioned", {"resource": "memory_gb"})
            * server.metric("costserve_price_usd", {"resource": "memory"})
        ) / 3600
        assert (after[key] - before[key]) / ((t2 - t1) / 1000) == pytest.approx(per_second, rel=0.05)

        window = Window(before, after, t1, t2)
        # What the repository did: two models serve, broken's two versions failed, one in the window.
        versions = window.gauge("costserve_model_versions", ["model", "state"])
        assert {dict(key)["model"] for key, count in versions.items() if count} == {DIGITS, TWIN, BROKEN}
        for model, state, count in [(DIGITS, "available", 1), (TWIN, "available", 1), (BROKEN, "failed", 2)]:
            assert versions[frozenset({"model": model, "state": state}.items())] == count, versions
        assert sum(window.increase("costserve_model_load_failures_total", model=BROKEN).values()) > 0

        # Every dashboard query, at t2, over the window [t1 - 1 ms, t2], for each pick of $model.
        # A query may come back empty only for a pick of models that has no such series.
        for model in MODEL_SELECTIONS:
            expectations = _dashboard_expectations(window, model)
            for title, query in _dashboard_targets():
                expr = _with_window(query["expr"], window.range_ms, DASHBOARD_RANGES).replace(MODEL_VARIABLE, model)
                got = prometheus.values(expr, t2)
                expected, rel = expectations[(title, query["refId"])]
                _assert_matches(f"{title} {query['refId']}: {expr}", got, expected, rel, model != ALL_MODELS)
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", query.get("legendFormat", "")):
                    assert all(label in dict(key) for key in got), f"{title}: legend {{{{{label}}}}} is not in {expr}"

        # The recording rules: loaded from deploy/prometheus/rules.yml, healthy, recording; each
        # expression, with the test's window for [1m], equal to the server's figure.
        rule_expectations = _rule_expectations(window)
        prometheus.wait(
            lambda: prometheus.rules_recorded(t2, len(rule_expectations)), "every rule to record a value after t2"
        )
        rules = prometheus.recording_rules()
        assert {rule["name"] for rule in rules} == rule_expectations.keys()
        assert len(rules) + len(_alert_expectations(window)) == rule_count
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            assert _ranges(rule["query"]) <= {RULE_RANGE}, rule["query"]
            expr = _with_window(rule["query"], window.range_ms, [RULE_RANGE])
            expected, rel = rule_expectations[rule["name"]]
            _assert_matches(f"rule {rule['name']}: {expr}", prometheus.values(expr, t2), expected, rel)

        # The alerts: their expression equal to the server's figures at t2, and firing for
        # those series (broken's failed versions), labelled as rules.yml says.
        alert_expectations = _alert_expectations(window)
        alerts = prometheus.alerting_rules()
        assert {alert["name"] for alert in alerts} == alert_expectations.keys()
        for alert in alerts:
            assert alert["health"] == "ok" and not alert.get("lastError"), alert
            assert not _ranges(alert["query"]), alert["query"]
            expected, rel = alert_expectations[alert["name"]]
            _assert_matches(
                f"alert {alert['name']}: {alert['query']}", prometheus.values(alert["query"], t2), expected, rel
            )
            prometheus.wait(
                lambda name=alert["name"], series=set(expected): prometheus.firing(name) == series,
                f"{alert['name']} to fire for {sorted(str(dict(key)) for key in expected)}",
            )

        # The headline figure once more, straight from the server's counters: USD per 1,000
        # predictions by precision is 1000 * (cost charged) / (images answered) in the window.
        per_1k = {
            "dashboard": next(t for p, t in _dashboard_targets() if p == "Cost per 1,000 predictions")["expr"].replace(
                MODEL_VARIABLE, ALL_MODELS
            ),
            "rule": next(r for r in rules if r["name"].startswith("job_precision:costserve_cost_per_1k"))["query"],
        }

        def served(name: str, precision: str) -> float:
            return sum(
                after[key] - before[key] for key in after if key[0] == name and ("precision", precision) in key[1]
            )

        for precision in ("fp32", "int8"):
            cost, images = served("costserve_cost_usd_total", precision), served("costserve_images_total", precision)
            assert cost > 0 and images > 0
            for source, expr in per_1k.items():
                got = prometheus.values(_with_window(expr, window.range_ms, [*DASHBOARD_RANGES, RULE_RANGE]), t2)
                (value,) = [v for labels, v in got.items() if ("precision", precision) in labels]
                assert value == pytest.approx(1000 * cost / images, rel=EXACT), (source, precision)
    except BaseException:
        print("prometheus log (last lines):\n" + prometheus.log)
        raise
    finally:
        prometheus.stop()
