"""``costserve cost``: what the predictions a server answered cost, and what would cut it.

::

    costserve cost [--metrics-url URL] [--json]                  # totals since the server started
    costserve cost --prometheus URL [--window 1h] [--json]     # increase() over the window
    costserve cost --by-tenant [...]                              # spend per tenant beside its budget
    costserve cost --by-model [...]                               # requests, predictions and cost per model

The figures, for each precision (``fp32``, ``int8``) and for all of them:

* **predictions**: images answered, ``costserve_images_total`` (cache hits included).
* **cost per 1,000 / per 1,000,000 predictions**: ``1e3`` / ``1e6`` × the USD charged
  to them, ``Σ costserve_cost_usd_total{precision}`` over CPU, memory and network,
  ÷ predictions; the same per 1M split by resource.
* **cache saved**: cache hits priced as if they had been computed:
  ``hits × I × U``, with ``I`` the mean inference CPU-seconds per computed image,
  ``costserve_cpu_seconds_total{phase="inference"} / costserve_images_total{cache="miss"}``,
  and ``U`` the USD charged per attributed CPU-second,
  ``(cost{cpu} + cost{memory}) / Σ costserve_cpu_seconds_total`` (both phases).
  Its share is of what the bill would have been: ``saved / (charged + saved)``.
* **utilization, measured**: ``costserve_utilization``, CPU-seconds attributed to
  requests over the server's trailing pricing window ÷ (window × vCPUs), before the
  clamp (with ``--prometheus``: its average over the window).
* **utilization, average**: the list-price value of the CPU and memory requests used,
  ``Σ cpu_seconds × (vCPU price + memory GB per vCPU × memory price)``, ÷ what the
  provisioned CPU and memory cost, ``costserve_provisioned_cost_usd_total``: the
  share of the provisioned capacity that did work.
* **idle share**: ``max(provisioned − charged CPU+memory, 0) / provisioned``, the part
  of the provisioned cost no prediction paid for. Predictions pay their CPU and memory
  ÷ the measured utilization, so idle capacity is priced into them, except below the
  pricing floor (``min_utilization``) and while no traffic arrives.

Without ``--prometheus`` the figures are totals since the server started, read from
its ``/metrics``. With ``--prometheus URL`` they are ``increase(...[window])`` of the
same counters from the Prometheus HTTP API, summed over every scraped server (prices
and provisioned shape taken from the largest, assumed the same for all).

``--by-model`` splits requests (``costserve_requests_total``), predictions
(``costserve_images_total``) and cost (``costserve_cost_usd_total``) by their ``model``
label; samples without a model name (calls of no one model, such as ``ListModels`` or
those refused before a model was resolved, and every sample of a server older than the
label) count as model ``""``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from costserve import metrics_text
from costserve.metrics_text import Samples
from costserve.metrics_text import total as _sum

#: Precisions a costserve server answers with; each gets a row even without traffic.
PRECISIONS = ("fp32", "int8")
#: Resources a prediction is charged for.
RESOURCES = ("cpu", "memory", "network")
DEFAULT_METRICS_URL = "http://127.0.0.1:8000/metrics"
DEFAULT_WINDOW = "1h"
#: Average utilization under which the idle capacity is called out.
LOW_UTILIZATION = 0.5
#: Measured utilization from which the server counts as under load (for the batching advice).
BUSY_UTILIZATION = 0.5
#: Mean batch size under which batches count as small (for the batching advice).
SMALL_BATCH = 2.0
#: Difference of cache hit rates between precisions from which the int8/fp32 comparison is flagged.
HIT_RATE_GAP = 0.1

#: What each figure means; printed under the text report and included in the JSON.
DEFINITIONS = {
    "predictions": "images answered (costserve_images_total), cache hits included",
    "per_1k_usd": "1e3 x USD charged (CPU + memory + network, costserve_cost_usd_total) / predictions",
    "per_1m_usd": "1e6 x USD charged / predictions; per_1m_by_resource_usd splits it by resource",
    "cache_savings_usd": "cache hits x mean inference CPU-seconds per computed image x USD charged "
    "(CPU + memory) per attributed CPU-second",
    "cache_savings_share": "cache_savings_usd / (USD charged + cache_savings_usd)",
    "utilization_measured": "costserve_utilization: attributed CPU-seconds over the server's pricing window "
    "/ (window x vCPUs), before the clamp",
    "utilization_average": "list-price value of the CPU and memory requests used / provisioned CPU+memory cost",
    "idle_share": "max(provisioned - charged CPU+memory, 0) / provisioned: the provisioned cost no prediction paid for",
}

_WINDOW_RE = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


class CostReportError(Exception):
    """The metrics could not be read or hold no costserve figures."""


@dataclass(frozen=True)
class Figures:
    """What a set of predictions cost (one precision, or all of them)."""

    predictions: float
    cache_hits: float
    cost_usd: float
    cost_by_resource_usd: dict[str, float]
    #: ``None`` when there were no predictions.
    per_1k_usd: float | None
    per_1m_usd: float | None
    per_1m_by_resource_usd: dict[str, float] | None
    #: ``None`` when hits cannot be priced (hits, but no image was computed or no CPU attributed).
    cache_savings_usd: float | None
    cache_savings_share: float | None


@dataclass(frozen=True)
class PrecisionFigures(Figures):
    """:class:`Figures` of one precision, with the inputs of its cache savings."""

    precision: str
    #: Mean inference CPU-seconds per computed (cache-miss) image.
    inference_cpu_seconds_per_computed_image: float | None
    #: USD charged for CPU and memory per attributed CPU-second.
    usd_per_cpu_second: float | None
    #: Mean images per runtime call (``costserve_batch_size`` sum / count).
    mean_batch_size: float | None
    #: Held-out accuracy of the variant (``costserve_model_info``).
    accuracy: float | None


@dataclass(frozen=True)
class CostReport:
    """The whole report; :func:`compute_report` builds it, :func:`format_report` prints it."""

    source: str
    period: str
    precisions: list[PrecisionFigures]
    total: Figures
    utilization_measured: float | None
    utilization_average: float | None
    provisioned_usd: float
    charged_compute_usd: float
    idle_share: float | None
    recommendations: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data, with the :data:`DEFINITIONS`."""
        return {**dataclasses.asdict(self), "definitions": DEFINITIONS}


def parse_metrics_text(text: str) -> Samples:
    """Samples of a Prometheus text exposition (``_created`` samples left out); raises :class:`CostReportError`."""
    try:
        return metrics_text.parse(text)
    except ValueError as error:
        raise CostReportError(f"not Prometheus metrics text: {error}") from None


def prometheus_queries(window: str) -> dict[str, str]:
    """The PromQL expression that yields each sample the report reads, over ``window``."""

    def increase(metric: str, by: str) -> str:
        return f"sum by ({by}) (increase({metric}[{window}]))"

    def latest(metric: str, by: str) -> str:
        return f"max by ({by}) (max_over_time({metric}[{window}]))"

    return {
        "costserve_images_total": increase("costserve_images_total", "model, precision, cache"),
        "costserve_cost_usd_total": increase("costserve_cost_usd_total", "model, precision, resource"),
        "costserve_requests_total": increase("costserve_requests_total", "model, code"),
        "costserve_cpu_seconds_total": increase("costserve_cpu_seconds_total", "precision, phase"),
        "costserve_batch_size_sum": increase("costserve_batch_size_sum", "precision"),
        "costserve_batch_size_count": increase("costserve_batch_size_count", "precision"),
        "costserve_provisioned_cost_usd_total": f"sum(increase(costserve_provisioned_cost_usd_total[{window}]))",
        "costserve_utilization": f"avg(avg_over_time(costserve_utilization[{window}]))",
        "costserve_price_usd": latest("costserve_price_usd", "resource"),
        "costserve_provisioned": latest("costserve_provisioned", "resource"),
        "costserve_model_info": latest("costserve_model_info", "precision, accuracy"),
        "costserve_tenant_spend_usd_total": increase("costserve_tenant_spend_usd_total", "tenant"),
        "costserve_budget_rejections_total": increase("costserve_budget_rejections_total", "tenant"),
        "costserve_tenant_budget_usd": latest("costserve_tenant_budget_usd", "tenant, period"),
    }


def _http_get(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", errors="replace").strip()[:300]
        raise CostReportError(f"{url} answered HTTP {error.code} {error.reason}: {body}") from None
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise CostReportError(f"cannot read {url}: {getattr(error, 'reason', error)}") from None


def read_metrics(url: str, timeout: float) -> Samples:
    """Scrape a costserve server's ``/metrics``; raises :class:`CostReportError`."""
    samples = parse_metrics_text(_http_get(url, timeout))
    if "costserve_provisioned_cost_usd_total" not in samples:
        raise CostReportError(f"{url} has no costserve metrics (is it a costserve server's /metrics?)")
    return samples


def query_prometheus(base_url: str, window: str, timeout: float) -> Samples:
    """Run :func:`prometheus_queries` against a Prometheus server's HTTP API; raises :class:`CostReportError`."""
    endpoint = base_url.rstrip("/") + "/api/v1/query"
    samples: Samples = {}
    for name, query in prometheus_queries(window).items():
        url = f"{endpoint}?{urllib.parse.urlencode({'query': query})}"
        try:
            answer = json.loads(_http_get(url, timeout))
            if answer["status"] != "success":
                raise CostReportError(f"Prometheus refused {query!r}: {answer.get('error', answer)}")
            samples[name] = [(series["metric"], float(series["value"][1])) for series in answer["data"]["result"]]
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise CostReportError(f"{endpoint} did not answer like the Prometheus HTTP API: {error!r}") from None
    if not samples["costserve_price_usd"]:
        raise CostReportError(
            f"Prometheus at {base_url} has no costserve series in the last {window} "
            "(is it scraping a costserve server?)"
        )
    return samples


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _figures(hits: float, misses: float, cost_by_resource: dict[str, float], savings: float | None) -> dict[str, Any]:
    predictions = hits + misses
    cost = sum(cost_by_resource.values())
    has_traffic = predictions > 0
    return {
        "predictions": predictions,
        "cache_hits": hits,
        "cost_usd": cost,
        "cost_by_resource_usd": cost_by_resource,
        "per_1k_usd": 1e3 * cost / predictions if has_traffic else None,
        "per_1m_usd": 1e6 * cost / predictions if has_traffic else None,
        "per_1m_by_resource_usd": (
            {resource: 1e6 * usd / predictions for resource, usd in cost_by_resource.items()} if has_traffic else None
        ),
        "cache_savings_usd": savings,
        "cache_savings_share": _ratio(savings, cost + savings) if savings is not None else None,
    }


def _precision_figures(samples: Samples, precision: str) -> PrecisionFigures:
    hits = _sum(samples, "costserve_images_total", precision=precision, cache="hit")
    misses = _sum(samples, "costserve_images_total", precision=precision, cache="miss")
    cost_by_resource = {
        resource: _sum(samples, "costserve_cost_usd_total", precision=precision, resource=resource)
        for resource in RESOURCES
    }
    per_image = _ratio(_sum(samples, "costserve_cpu_seconds_total", precision=precision, phase="inference"), misses)
    per_cpu_second = _ratio(
        cost_by_resource["cpu"] + cost_by_resource["memory"],
        _sum(samples, "costserve_cpu_seconds_total", precision=precision),
    )
    if hits == 0:
        savings: float | None = 0.0
    elif per_image is None or per_cpu_second is None:
        savings = None
    else:
        savings = hits * per_image * per_cpu_second
    accuracies = [
        float(labels["accuracy"])
        for labels, value in samples.get("costserve_model_info", [])
        # An empty or non-numeric accuracy: unknown (a version imported without held-out data).
        if labels.get("precision") == precision and _is_number(labels.get("accuracy", "")) and value > 0
    ]
    return PrecisionFigures(
        **_figures(hits, misses, cost_by_resource, savings),
        precision=precision,
        inference_cpu_seconds_per_computed_image=per_image,
        usd_per_cpu_second=per_cpu_second,
        mean_batch_size=_ratio(
            _sum(samples, "costserve_batch_size_sum", precision=precision),
            _sum(samples, "costserve_batch_size_count", precision=precision),
        ),
        accuracy=accuracies[-1] if accuracies else None,
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _list_usd_per_cpu_second(samples: Samples) -> float | None:
    """A CPU-second and the memory provisioned beside it at list price (utilization 1); ``None`` without vCPUs."""
    vcpus = _sum(samples, "costserve_provisioned", resource="vcpus")
    if vcpus <= 0:
        return None
    memory_gb_per_vcpu = _sum(samples, "costserve_provisioned", resource="memory_gb") / vcpus
    prices = {resource: _sum(samples, "costserve_price_usd", resource=resource) for resource in ("cpu", "memory")}
    return (prices["cpu"] + memory_gb_per_vcpu * prices["memory"]) / 3600.0


def compute_report(samples: Samples, source: str, period: str) -> CostReport:
    """Every figure of the report (see the module docstring) from the samples of one period."""
    seen = {labels.get("precision", "") for labels, _ in samples.get("costserve_images_total", [])}
    names = [*PRECISIONS, *sorted(seen - set(PRECISIONS) - {""})]
    rows = [_precision_figures(samples, name) for name in names]
    priced = [row.cache_savings_usd for row in rows if row.cache_savings_usd is not None]
    total = Figures(
        **_figures(
            sum(row.cache_hits for row in rows),
            sum(row.predictions - row.cache_hits for row in rows),
            {resource: sum(row.cost_by_resource_usd[resource] for row in rows) for resource in RESOURCES},
            sum(priced) if priced else None,
        )
    )
    provisioned = _sum(samples, "costserve_provisioned_cost_usd_total")
    charged = total.cost_by_resource_usd["cpu"] + total.cost_by_resource_usd["memory"]
    list_price = _list_usd_per_cpu_second(samples)
    used_usd = _sum(samples, "costserve_cpu_seconds_total") * list_price if list_price is not None else None
    measured = samples.get("costserve_utilization")
    report = CostReport(
        source=source,
        period=period,
        precisions=rows,
        total=total,
        utilization_measured=measured[0][1] if measured else None,
        utilization_average=_ratio(used_usd, provisioned) if used_usd is not None else None,
        provisioned_usd=provisioned,
        charged_compute_usd=charged,
        idle_share=_ratio(max(provisioned - charged, 0.0), provisioned),
        recommendations=[],
    )
    return dataclasses.replace(report, recommendations=recommend(report))


@dataclass(frozen=True)
class TenantFigures:
    """One tenant's spend (``other``: every tenant without a budget), budget and refusals."""

    tenant: str
    spend_usd: float
    budget_usd: float | None
    period: str | None
    rejections: float


def tenant_figures(samples: Samples) -> list[TenantFigures]:
    """Spend per tenant from ``costserve_tenant_spend_usd_total``, most spent first."""
    budgets = {
        labels.get("tenant", ""): (value, labels.get("period"))
        for labels, value in samples.get("costserve_tenant_budget_usd", [])
    }
    tenants = {labels.get("tenant", "") for labels, _ in samples.get("costserve_tenant_spend_usd_total", [])} | set(
        budgets
    )
    figures = [
        TenantFigures(
            tenant,
            _sum(samples, "costserve_tenant_spend_usd_total", tenant=tenant),
            budgets.get(tenant, (None, None))[0],
            budgets.get(tenant, (None, None))[1],
            _sum(samples, "costserve_budget_rejections_total", tenant=tenant),
        )
        for tenant in tenants
    ]
    return sorted(figures, key=lambda figure: (-figure.spend_usd, figure.tenant))


def format_tenants(figures: list[TenantFigures], source: str, period: str) -> str:
    """The ``--by-tenant`` table."""
    lines = [f"costserve spend by tenant: {source}, {period}", ""]
    if not figures:
        return "\n".join(lines + ["no tenant metrics (is the server older than costserve_tenant_spend_usd_total?)"])
    rows = [("tenant", "spend", "budget", "refused")] + [
        (
            figure.tenant,
            format_usd(figure.spend_usd),
            "none" if figure.budget_usd is None else f"{format_usd(figure.budget_usd)} per {figure.period}",
            f"{figure.rejections:.0f}",
        )
        for figure in figures
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        lines.append(
            "  ".join(
                cell.ljust(width) if column == 0 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(row, widths))
            ).rstrip()
        )
    lines += [
        "",
        "other: every tenant without a budget in the server's --budgets file, counted together.",
        "Spend since the server started (or over the window); budgets reset each UTC hour or day.",
    ]
    return "\n".join(lines)


#: What each ``--by-model`` figure means; included in its JSON.
MODEL_DEFINITIONS = {
    "model": 'the model label; "" for samples without a model name (calls of no one model, such as ListModels '
    "or those refused before a model was resolved; every sample of a server older than the label)",
    "requests": "calls counted by costserve_requests_total, answered or refused",
    "failed_requests": "those whose status was not OK",
    "predictions": "images answered (costserve_images_total), cache hits included",
    "cache_hits": "the predictions served from the cache",
    "cost_usd": "USD charged (CPU + memory + network, costserve_cost_usd_total)",
    "cost_share": "cost_usd / the cost of every model",
    "per_1k_usd": "1e3 x cost_usd / predictions",
    "per_1m_usd": "1e6 x cost_usd / predictions",
}


@dataclass(frozen=True)
class ModelFigures:
    """One model's requests, predictions and cost (``model`` ``"all"`` for the total)."""

    model: str
    requests: float
    failed_requests: float
    predictions: float
    cache_hits: float
    predictions_by_precision: dict[str, float]
    cost_usd: float
    cost_by_resource_usd: dict[str, float]
    #: ``None`` when nothing was charged to any model.
    cost_share: float | None
    #: ``None`` when the model answered no prediction.
    per_1k_usd: float | None
    per_1m_usd: float | None


def _model_row(
    model: str,
    requests: float,
    ok: float,
    images: dict[str, dict[str, float]],
    resources: dict[str, float],
    all_models_usd: float,
) -> ModelFigures:
    """One row of ``--by-model``: ``images`` maps each precision to its {"hit", "miss"} image counts."""
    predictions = sum(sum(counts.values()) for counts in images.values())
    usd = sum(resources.values())
    return ModelFigures(
        model=model,
        requests=requests,
        failed_requests=requests - ok,
        predictions=predictions,
        cache_hits=sum(counts.get("hit", 0.0) for counts in images.values()),
        predictions_by_precision={precision: sum(counts.values()) for precision, counts in sorted(images.items())},
        cost_usd=usd,
        cost_by_resource_usd=resources,
        cost_share=_ratio(usd, all_models_usd),
        per_1k_usd=1e3 * usd / predictions if predictions > 0 else None,
        per_1m_usd=1e6 * usd / predictions if predictions > 0 else None,
    )


def model_figures(samples: Samples) -> tuple[list[ModelFigures], ModelFigures]:
    """Requests, predictions and cost per ``model`` label (most cost first), and their total (model ``"all"``)."""

    def by_model(name: str, **labels: str) -> dict[str, float]:
        return metrics_text.by_label(samples, name, "model", absent="", **labels)

    requests, ok = by_model("costserve_requests_total"), by_model("costserve_requests_total", code="OK")
    cost = {resource: by_model("costserve_cost_usd_total", resource=resource) for resource in RESOURCES}
    # model -> precision -> cache ("hit", "miss") -> images.
    images: dict[str, dict[str, dict[str, float]]] = {}
    for labels, value in samples.get("costserve_images_total", []):
        counts = images.setdefault(labels.get("model", ""), {}).setdefault(labels.get("precision", ""), {})
        counts[labels.get("cache", "")] = counts.get(labels.get("cache", ""), 0.0) + value
    models = set(requests) | set(images) | {model for sums in cost.values() for model in sums}
    all_usd = sum(sum(sums.values()) for sums in cost.values())
    rows = [
        _model_row(
            model,
            requests.get(model, 0.0),
            ok.get(model, 0.0),
            images.get(model, {}),
            {resource: cost[resource].get(model, 0.0) for resource in RESOURCES},
            all_usd,
        )
        for model in models
    ]
    rows.sort(key=lambda row: (-row.cost_usd, -row.requests, row.model))
    every_image: dict[str, dict[str, float]] = {}
    for per_precision in images.values():
        for precision, counts in per_precision.items():
            for cache, count in counts.items():
                merged = every_image.setdefault(precision, {})
                merged[cache] = merged.get(cache, 0.0) + count
    total = _model_row(
        "all",
        sum(requests.values()),
        sum(ok.values()),
        every_image,
        {resource: sum(cost[resource].values()) for resource in RESOURCES},
        all_usd,
    )
    return rows, total


def format_models(rows: list[ModelFigures], total: ModelFigures, source: str, period: str) -> str:
    """The ``--by-model`` table."""
    lines = [f"costserve cost by model: {source}, {period}", ""]
    if not rows:
        return "\n".join(lines + ["no request metrics yet (costserve_requests_total has no samples)"])
    table = [("model", "requests", "failed", "predictions", "cache hits", "cost", "share", "per 1K", "per 1M")]
    for row in [*rows, total]:
        table.append(
            (
                row.model or "(none)",
                f"{row.requests:,.0f}",
                f"{row.failed_requests:,.0f}",
                f"{row.predictions:,.0f}",
                f"{row.cache_hits:,.0f} ({row.cache_hits / row.predictions:.0%})" if row.predictions else "-",
                format_usd(row.cost_usd),
                _percent(row.cost_share),
                format_usd(row.per_1k_usd),
                format_usd(row.per_1m_usd),
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines += ["", "failed: requests whose status was not OK; per 1K/1M: USD charged per 1,000/1,000,000 predictions."]
    if any(row.model == "" for row in rows):
        lines += [
            "(none): no model name: calls of no one model (ListModels, or refused before a model was resolved),",
            "  or every sample of a server older than the model label.",
        ]
    return "\n".join(lines)


def format_usd(value: float | None) -> str:
    """Dollars with 4 significant digits and no exponent (``-`` for no value)."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f}"


def _percent(value: float | None) -> str:
    """A share as a percentage with 3 significant digits (``-`` for no value)."""
    return "-" if value is None else f"{value * 100:.3g}%"


def recommend(report: CostReport) -> list[str]:
    """Plain advice that the report's figures support, most valuable first."""
    if report.total.predictions == 0:
        return [f"no predictions were answered ({report.period}): nothing to price yet; send traffic and run again"]
    advice: list[str] = []
    rows = {row.precision: row for row in report.precisions}
    fp32, int8 = rows["fp32"], rows["int8"]
    if fp32.per_1m_usd is not None and int8.per_1m_usd is not None:
        if int8.per_1m_usd < fp32.per_1m_usd:
            saved = fp32.per_1m_usd - int8.per_1m_usd
            line = (
                f"answering fp32 traffic with int8 would save {format_usd(saved)} per 1M predictions "
                f"({saved / fp32.per_1m_usd:.0%}), {format_usd(saved * fp32.predictions / 1e6)} on the "
                f"{fp32.predictions:,.0f} fp32 predictions here"
            )
            if fp32.accuracy is not None and int8.accuracy is not None:
                line += f"; held-out accuracy int8 {int8.accuracy:.2%} vs fp32 {fp32.accuracy:.2%}"
            advice.append(line)
        else:
            advice.append(
                f"int8 cost no less than fp32 on this traffic ({format_usd(int8.per_1m_usd)} vs "
                f"{format_usd(fp32.per_1m_usd)} per 1M predictions): switching to int8 would not save money"
            )
        hit_rates = {row.precision: row.cache_hits / row.predictions for row in (fp32, int8)}
        if abs(hit_rates["fp32"] - hit_rates["int8"]) >= HIT_RATE_GAP:
            advice.append(
                f"the two precisions had different cache hit rates (fp32 {hit_rates['fp32']:.0%}, int8 "
                f"{hit_rates['int8']:.0%}), which moves their per-prediction cost; compare them at similar hit rates"
            )
    else:
        for row in (fp32, int8):
            if row.predictions == 0:
                advice.append(
                    f"no {row.precision} predictions were answered ({report.period}), so fp32 and int8 cannot be "
                    f"compared; send some traffic with precision={row.precision} to price it"
                )
    busy = report.utilization_measured is not None and report.utilization_measured >= BUSY_UTILIZATION
    for row in report.precisions:
        if busy and row.mean_batch_size is not None and row.mean_batch_size < SMALL_BATCH:
            advice.append(
                f"{row.precision} batches averaged {row.mean_batch_size:.2f} images while the CPU was "
                f"{report.utilization_measured:.0%} busy: larger batches (raise --batch-timeout-ms, check "
                "--max-batch-size) would spread each runtime call over more images"
            )
    if report.utilization_average is not None and report.utilization_average < LOW_UTILIZATION:
        advice.append(
            f"the provisioned CPU was {_percent(report.utilization_average)} busy on average, so idle capacity "
            f"dominates the bill: {_percent(1 - report.utilization_average)} of the "
            f"{format_usd(report.provisioned_usd)} provisioned paid for idle CPU and memory "
            f"({_percent(report.idle_share)} was charged to no prediction); fewer or smaller replicas "
            "(fewer vCPUs) would cut it"
        )
    return advice or ["nothing to change: these figures show no cheaper way to serve this traffic"]


def format_report(report: CostReport) -> str:
    """The report as a small table and a few lines of text."""
    lines = [f"costserve cost: {report.period}, from {report.source}", ""]
    if report.total.predictions == 0:
        lines += [
            f"No predictions were answered ({report.period}); nothing to price yet.",
            f"The provisioned CPU and memory cost {format_usd(report.provisioned_usd)} over the period.",
        ]
        return "\n".join(lines)
    header = (
        "precision",
        "predictions",
        "cache hits",
        "per 1K",
        "per 1M",
        "CPU/1M",
        "memory/1M",
        "network/1M",
        "cache saved",
    )
    table: list[tuple[str, ...]] = [header]
    for label, row in [*((row.precision, row) for row in report.precisions), ("all", report.total)]:
        if row.predictions == 0:
            table.append((label, "0", "no traffic", *("-",) * 6))
            continue
        by_resource = row.per_1m_by_resource_usd or {}
        table.append(
            (
                label,
                f"{row.predictions:,.0f}",
                f"{row.cache_hits:,.0f} ({row.cache_hits / row.predictions:.0%})",
                format_usd(row.per_1k_usd),
                format_usd(row.per_1m_usd),
                *(format_usd(by_resource.get(resource)) for resource in RESOURCES),
                format_usd(row.cache_savings_usd) if row.cache_savings_usd is not None else "n/a",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    total = report.total
    if total.cache_savings_usd is None:
        lines.append("Cache: its hits cannot be priced, no image of their precision was computed.")
    else:
        lines.append(
            f"Cache: hits priced as if computed saved {format_usd(total.cache_savings_usd)}, "
            f"{_percent(total.cache_savings_share)} of what the bill would have been."
        )
    for row in report.precisions:
        if row.cache_hits > 0 and row.cache_savings_usd is None:
            lines.append(f"  {row.precision}: hits cannot be priced, no {row.precision} image was computed.")
        elif row.cache_hits > 0:
            lines.append(
                f"  {row.precision}: {row.cache_hits:,.0f} hits x "
                f"{(row.inference_cpu_seconds_per_computed_image or 0) * 1e3:.3f} ms inference CPU per computed "
                f"image x {format_usd(row.usd_per_cpu_second)} per CPU-second = {format_usd(row.cache_savings_usd)}"
            )
    lines += [
        f"Utilization: {_percent(report.utilization_measured)} measured (server's pricing window), "
        f"{_percent(report.utilization_average)} on average over the period.",
        f"Provisioned CPU+memory {format_usd(report.provisioned_usd)}, charged to predictions "
        f"{format_usd(report.charged_compute_usd)}: idle share {_percent(report.idle_share)}.",
        "  (idle share: the provisioned cost no prediction paid for; predictions carry idle capacity in their "
        "price except below the pricing floor and while no traffic arrives)",
        "",
        "Recommendations:",
        *(f"  - {line}" for line in report.recommendations),
        "",
        "Definitions:",
        *(f"  {name}: {meaning}" for name, meaning in DEFINITIONS.items()),
    ]
    return "\n".join(lines)


def _window(text: str) -> str:
    if not _WINDOW_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Prometheus duration such as 30m, 1h or 1d12h")
    return text


def add_parser(commands: Any) -> None:
    """Add the ``cost`` subcommand to ``costserve``'s subparsers."""
    cost = commands.add_parser(
        "cost",
        help="what predictions cost per 1K/1M by precision, cache savings, idle share, advice",
        description="Price the predictions a server answered, from its /metrics (totals since it started) "
        "or from Prometheus (increase over --window).",
    )
    cost.add_argument(
        "--metrics-url",
        metavar="URL",
        default=os.environ.get("COSTSERVE_METRICS_URL", DEFAULT_METRICS_URL),
        help=f"the server's metrics endpoint [env COSTSERVE_METRICS_URL, default {DEFAULT_METRICS_URL}]",
    )
    cost.add_argument(
        "--prometheus",
        metavar="URL",
        default=os.environ.get("COSTSERVE_PROMETHEUS"),
        help="read the counters' increase over --window from this Prometheus server instead "
        "(e.g. http://127.0.0.1:9090) [env COSTSERVE_PROMETHEUS]",
    )
    cost.add_argument(
        "--window",
        metavar="DURATION",
        type=_window,
        default=os.environ.get("COSTSERVE_WINDOW", DEFAULT_WINDOW),
        help="period covered with --prometheus, a Prometheus duration "
        f"[env COSTSERVE_WINDOW, default {DEFAULT_WINDOW}]",
    )
    cost.add_argument("--json", action="store_true", help="print one JSON document")
    breakdown = cost.add_mutually_exclusive_group()
    breakdown.add_argument(
        "--by-tenant", action="store_true", help="spend per tenant (x-costserve-tenant) beside its budget and refusals"
    )
    breakdown.add_argument("--by-model", action="store_true", help="requests, predictions and cost per served model")


def run(args: argparse.Namespace) -> int:
    """Run ``costserve cost``: 0 on success (no traffic included), 1 when the metrics cannot be read."""
    try:
        if args.prometheus:
            samples = query_prometheus(args.prometheus, args.window, args.timeout)
            source, period = f"Prometheus {args.prometheus}", f"increase over the last {args.window}"
        else:
            samples = read_metrics(args.metrics_url, args.timeout)
            source, period = args.metrics_url, "totals since the server started"
    except CostReportError as error:
        print(f"costserve cost: {error}", file=sys.stderr)
        return 1
    if getattr(args, "by_tenant", False):
        tenants = tenant_figures(samples)
        if args.json:
            print(
                json.dumps(
                    {"source": source, "period": period, "tenants": [dataclasses.asdict(t) for t in tenants]}, indent=2
                )
            )
        else:
            print(format_tenants(tenants, source, period))
        return 0
    if getattr(args, "by_model", False):
        rows, total = model_figures(samples)
        if args.json:
            document = {
                "source": source,
                "period": period,
                "models": [dataclasses.asdict(row) for row in rows],
                "total": dataclasses.asdict(total),
                "definitions": MODEL_DEFINITIONS,
            }
            print(json.dumps(document, indent=2))
        else:
            print(format_models(rows, total, source, period))
        return 0
    report = compute_report(samples, source, period)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
