"""`costserve cost`: the formulas on hand-written metrics, a real server's traffic, Prometheus, and errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from conftest import EXAMPLES, Route, RunningServer

from costserve import Client
from costserve.cli import main
from costserve.cost_report import compute_report, format_usd, parse_metrics_text, prometheus_queries

#: Two precisions' worth of counters, chosen so every figure is easy to work out by hand.
METRICS_TEXT = """\
# TYPE costserve_images_total counter
costserve_images_total{precision="fp32",cache="hit"} 20.0
costserve_images_total{precision="fp32",cache="miss"} 80.0
costserve_images_total{precision="int8",cache="miss"} 50.0
# TYPE costserve_cost_usd_total counter
costserve_cost_usd_total{resource="cpu",precision="fp32"} 0.006
costserve_cost_usd_total{resource="memory",precision="fp32"} 0.003
costserve_cost_usd_total{resource="network",precision="fp32"} 0.001
costserve_cost_usd_total{resource="cpu",precision="int8"} 0.002
costserve_cost_usd_total{resource="memory",precision="int8"} 0.001
costserve_cost_usd_total{resource="network",precision="int8"} 0.0005
# TYPE costserve_cpu_seconds_total counter
costserve_cpu_seconds_total{precision="fp32",phase="inference"} 4.0
costserve_cpu_seconds_total{precision="fp32",phase="handling"} 1.0
costserve_cpu_seconds_total{precision="int8",phase="inference"} 1.5
costserve_cpu_seconds_total{precision="int8",phase="handling"} 0.5
# TYPE costserve_batch_size histogram
costserve_batch_size_bucket{precision="fp32",le="+Inf"} 60.0
costserve_batch_size_sum{precision="fp32"} 80.0
costserve_batch_size_count{precision="fp32"} 60.0
costserve_batch_size_bucket{precision="int8",le="+Inf"} 10.0
costserve_batch_size_sum{precision="int8"} 50.0
costserve_batch_size_count{precision="int8"} 10.0
# TYPE costserve_utilization gauge
costserve_utilization 0.7
# TYPE costserve_price_usd gauge
costserve_price_usd{resource="cpu"} 0.036
costserve_price_usd{resource="memory"} 0.0036
costserve_price_usd{resource="network"} 0.01
# TYPE costserve_provisioned gauge
costserve_provisioned{resource="vcpus"} 2.0
costserve_provisioned{resource="memory_gb"} 8.0
# TYPE costserve_provisioned_cost_usd_total counter
costserve_provisioned_cost_usd_total 0.05
# TYPE costserve_model_info gauge
costserve_model_info{name="digits",version="1",precision="fp32",format="saved_model",accuracy="0.9861"} 1.0
costserve_model_info{name="digits",version="1",precision="int8",format="tflite",accuracy="0.9833"} 1.0
"""


def close(actual: float | None, expected: float, rel: float = 1e-9) -> bool:
    return actual is not None and math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-300)


def test_formulas_on_hand_written_metrics() -> None:
    report = compute_report(parse_metrics_text(METRICS_TEXT), "test", "totals since the server started")
    fp32, int8 = report.precisions
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert (fp32.predictions, fp32.cache_hits, int8.predictions) == (100, 20, 50)
    assert close(fp32.per_1k_usd, 0.1) and close(fp32.per_1m_usd, 100.0)  # 1e6 x 0.01 / 100
    assert close(int8.per_1m_usd, 70.0)  # 1e6 x 0.0035 / 50
    assert fp32.per_1m_by_resource_usd is not None
    assert [round(fp32.per_1m_by_resource_usd[r], 9) for r in ("cpu", "memory", "network")] == [60, 30, 10]
    # Hits priced as if computed: 20 hits x (4.0 s / 80 computed) x ((0.006 + 0.003) USD / 5.0 s).
    assert close(fp32.inference_cpu_seconds_per_computed_image, 0.05)
    assert close(fp32.usd_per_cpu_second, 0.0018)
    assert close(fp32.cache_savings_usd, 0.0018)
    assert close(fp32.cache_savings_share, 0.0018 / 0.0118)
    assert int8.cache_savings_usd == 0.0
    assert close(report.total.per_1m_usd, 1e6 * 0.0135 / 150) and close(report.total.cache_savings_usd, 0.0018)
    assert close(report.total.cache_savings_share, 0.0018 / (0.0135 + 0.0018))
    assert (fp32.mean_batch_size, int8.mean_batch_size) == (80 / 60, 5.0)
    assert (fp32.accuracy, int8.accuracy) == (0.9861, 0.9833)
    # Idle share: (0.05 provisioned - 0.012 charged CPU+memory) / 0.05.
    assert close(report.charged_compute_usd, 0.012) and close(report.idle_share, 0.76)
    # Average utilization: 7 CPU-seconds at (0.036 + 8 / 2 x 0.0036) / 3600 USD each, over 0.05 USD provisioned.
    assert close(report.utilization_average, 7 * 0.0504 / 3600 / 0.05)
    assert report.utilization_measured == 0.7
    int8_advice, hit_rates, batches, idle = report.recommendations
    assert int8_advice.startswith("answering fp32 traffic with int8 would save $30.00 per 1M predictions (30%)")
    assert "$0.003000 on the 100 fp32 predictions" in int8_advice and "int8 98.33% vs fp32 98.61%" in int8_advice
    assert "fp32 20%, int8 0%" in hit_rates
    assert batches.startswith("fp32 batches averaged 1.33 images while the CPU was 70% busy")
    assert "idle capacity dominates" in idle and "76% was charged to no prediction" in idle


def test_missing_precision_and_unpriceable_hits_are_said_not_divided() -> None:
    text = """\
costserve_images_total{precision="fp32",cache="hit"} 3.0
costserve_cost_usd_total{resource="network",precision="fp32"} 0.001
costserve_provisioned_cost_usd_total 0.05
"""
    report = compute_report(parse_metrics_text(text), "test", "totals since the server started")
    fp32, int8 = report.precisions
    assert fp32.cache_savings_usd is None and fp32.inference_cpu_seconds_per_computed_image is None
    assert int8.predictions == 0 and int8.per_1m_usd is None and int8.per_1m_by_resource_usd is None
    assert report.utilization_average is None and report.utilization_measured is None
    assert report.recommendations == [
        "no int8 predictions were answered (totals since the server started), so fp32 and int8 cannot be "
        "compared; send some traffic with precision=int8 to price it"
    ]


def metrics_url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.server.metrics_port}/metrics"


def test_prices_the_traffic_the_server_answered(
    start_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    pixels = np.random.default_rng(7).integers(0, 256, size=(28, 28), dtype=np.uint8)
    sent = {"fp32": [0.0, 0], "int8": [0.0, 0]}  # USD, images
    with Client(server.target, timeout=30) as client:
        for precision, totals in sent.items():
            for images, skip_cache in [
                (EXAMPLES, True),  # computed, not cached
                (EXAMPLES[:4], False),  # computed, cached
                (EXAMPLES[:4], False),  # hits
                ([pixels, pixels], False),  # a miss then, maybe, a hit
            ]:
                response = client.predict(images, precision=precision, skip_cache=skip_cache)
                totals[0] += response.cost.usd
                totals[1] += len(images)

    assert main(["cost", "--metrics-url", metrics_url(server), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = {row["precision"]: row for row in document["precisions"]}
    for precision, (usd, images) in sent.items():
        row = rows[precision]
        assert row["predictions"] == images
        assert close(row["per_1m_usd"], 1e6 * usd / images), (precision, row["per_1m_usd"], 1e6 * usd / images)
        assert close(row["per_1k_usd"], 1e3 * usd / images)
        # The cache savings, from the server's own metric values.
        labels = {"precision": precision}
        hits = server.metric("costserve_images_total", {**labels, "cache": "hit"})
        computed = server.metric("costserve_images_total", {**labels, "cache": "miss"})
        inference = server.metric("costserve_cpu_seconds_total", {**labels, "phase": "inference"})
        cpu = inference + server.metric("costserve_cpu_seconds_total", {**labels, "phase": "handling"})
        charged = sum(server.metric("costserve_cost_usd_total", {**labels, "resource": r}) for r in ("cpu", "memory"))
        assert hits >= 4
        assert row["cache_savings_usd"] > 0
        assert close(row["cache_savings_usd"], hits * (inference / computed) * (charged / cpu))

    assert main(["cost", "--metrics-url", metrics_url(server)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["fp32"], ["int8"])}
    for precision, (usd, images) in sent.items():
        per_1m = format_usd(1e6 * usd / images)
        assert per_1m in lines[precision].split(), (per_1m, lines[precision])
    assert "Cache: hits priced as if computed saved $" in out
    assert "answering fp32 traffic with int8" in out or "int8 cost no less than fp32" in out


def test_no_traffic_is_a_clear_message(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--metrics-url", metrics_url(server)]) == 0
    assert "No predictions were answered (totals since the server started); nothing to price yet." in (
        capsys.readouterr().out
    )
    assert main(["cost", "--metrics-url", metrics_url(server), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"]["predictions"] == 0 and document["total"]["per_1m_usd"] is None
    assert document["recommendations"][0].startswith("no predictions were answered")


def test_unreachable_metrics_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--timeout", "2", "cost", "--metrics-url", "http://127.0.0.1:1/metrics"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("costserve cost: cannot read http://127.0.0.1:1/metrics:")


def test_json_round_trips(http_server: Callable[[Route], str], capsys: pytest.CaptureFixture[str]) -> None:
    url = http_server(lambda path, query: (200, METRICS_TEXT)) + "/metrics"
    assert main(["cost", "--metrics-url", url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    expected = compute_report(parse_metrics_text(METRICS_TEXT), url, "totals since the server started").to_dict()
    assert document == expected
    assert [row["per_1m_usd"] for row in document["precisions"]] == pytest.approx([100.0, 70.0], rel=1e-9)


def test_a_page_without_costserve_metrics_is_an_error(
    http_server: Callable[[Route], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = http_server(lambda path, query: (200, "# TYPE up gauge\nup 1.0\n")) + "/metrics"
    assert main(["cost", "--metrics-url", url]) == 1
    assert "has no costserve metrics" in capsys.readouterr().err


def prometheus_api(window: str, samples: dict[str, list[tuple[dict[str, str], float]]]) -> Route:
    """A Prometheus HTTP API that knows the report's queries over ``window`` and answers them from ``samples``."""
    answers = {query: samples.get(name, []) for name, query in prometheus_queries(window).items()}

    def route(path: str, query: dict[str, str]) -> tuple[int, str]:
        if path != "/api/v1/query" or query.get("query") not in answers:
            return 400, json.dumps({"status": "error", "errorType": "bad_data", "error": f"unexpected {query}"})
        result = [{"metric": labels, "value": [1700000000.0, repr(value)]} for labels, value in answers[query["query"]]]
        return 200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})

    return route


def test_prometheus_reports_the_window(http_server: Callable[[Route], str], capsys: pytest.CaptureFixture[str]) -> None:
    samples = parse_metrics_text(METRICS_TEXT)
    base = http_server(prometheus_api("30m", samples))
    assert main(["cost", "--prometheus", base + "/", "--window", "30m", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    expected = compute_report(samples, f"Prometheus {base}/", "increase over the last 30m").to_dict()
    assert document == expected
    assert [row["per_1m_usd"] for row in document["precisions"]] == pytest.approx([100.0, 70.0], rel=1e-9)
    assert main(["cost", "--prometheus", base, "--window", "30m"]) == 0
    assert "costserve cost: increase over the last 30m, from Prometheus" in capsys.readouterr().out


def test_prometheus_errors_are_clear(http_server: Callable[[Route], str], capsys: pytest.CaptureFixture[str]) -> None:
    base = http_server(prometheus_api("30m", parse_metrics_text(METRICS_TEXT)))
    assert main(["cost", "--prometheus", base, "--window", "2h"]) == 1  # this API only knows 30m queries
    assert "answered HTTP 400" in capsys.readouterr().err
    empty = http_server(prometheus_api("1h", {}))
    assert main(["cost", "--prometheus", empty]) == 1
    assert "has no costserve series in the last 1h" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["cost", "--prometheus", base, "--window", "an hour"])
    assert exited.value.code == 2
    assert "not a Prometheus duration" in capsys.readouterr().err


def test_by_tenant_lists_spend_beside_budgets(
    start_budgeted_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_budgeted_server("[tenants.acme]\nusd_per_hour = 0.5\n[tenants.globex]\nusd_per_day = 2\n")
    spent = {"acme": 0.0, "other": 0.0}
    with Client(server.target, timeout=30) as client:
        for label, tenant in (("acme", "acme"), ("other", "zed"), ("other", None)):
            spent[label] += client.predict(EXAMPLES[:2], skip_cache=True, tenant=tenant).cost.usd

    assert main(["cost", "--metrics-url", metrics_url(server), "--by-tenant", "--json"]) == 0
    rows = {row["tenant"]: row for row in json.loads(capsys.readouterr().out)["tenants"]}
    assert set(rows) == {"acme", "globex", "other"}
    assert close(rows["acme"]["spend_usd"], spent["acme"], rel=1e-6) and rows["acme"]["budget_usd"] == 0.5
    assert rows["acme"]["period"] == "hour" and rows["globex"]["period"] == "day"
    assert rows["globex"]["spend_usd"] == 0 and rows["other"]["budget_usd"] is None
    assert close(rows["other"]["spend_usd"], spent["other"], rel=1e-6)

    assert main(["cost", "--metrics-url", metrics_url(server), "--by-tenant"]) == 0
    out = capsys.readouterr().out
    acme = next(line for line in out.splitlines() if line.startswith("acme"))
    assert format_usd(spent["acme"]) in acme.split() and "per hour" in acme
    assert "other: every tenant without a budget" in out
