"""Read a costserve server's ``/metrics``: parse the Prometheus text format, sum samples by labels.

The one reader of the text exposition in costserve: ``costserve cost`` uses it, and so do the
benchmarks and the tests that scrape a server process.

Example::

    from costserve import metrics_text

    samples = metrics_text.scrape("http://127.0.0.1:8000/metrics")
    ok = metrics_text.total(samples, "costserve_requests_total", code="OK")
    by_code = metrics_text.by_label(samples, "costserve_requests_total", "code", method="Predict")
    by_model = metrics_text.by_label(samples, "costserve_cost_usd_total", "model", absent="")  # "" for old servers
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

#: A sample name -> its (labels, value) pairs.
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition, ``_created`` samples left out.

    Raises ValueError when ``text`` is not in the Prometheus text format.
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    """GET ``url`` (a ``/metrics`` endpoint) and parse it; raises OSError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return parse(reply.read().decode("utf-8", errors="replace"))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none does)."""
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(key) == wanted for key, wanted in labels.items())
    )


def by_label(samples: Samples, name: str, label: str, *, absent: str | None = None, **labels: str) -> dict[str, float]:
    """Sums of the samples of ``name`` whose labels include ``labels``, by the value of ``label``.

    Samples without ``label`` are left out, or, with ``absent``, counted under that value (e.g. ``""`` for
    a server older than the label).
    """
    sums: dict[str, float] = {}
    for sample_labels, value in samples.get(name, []):
        group = sample_labels.get(label, absent)
        if group is not None and all(sample_labels.get(key) == wanted for key, wanted in labels.items()):
            sums[group] = sums.get(group, 0.0) + value
    return sums
