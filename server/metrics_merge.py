"""The machine's /metrics under ``--workers N``: every worker's metrics, scraped and merged.

Each worker is a whole costserve server with its own registry (its loop-local counters
stay plain numbers: no prometheus_client multiprocess mode) and serves its own /metrics
on 127.0.0.1 at an ephemeral port. The supervisor registers :class:`WorkerMetrics` on
its registry and serves that with :func:`~costserve.server.metrics_http.start_metrics_server`
(TLS and basic auth as for one server). At each scrape the collector fetches every
worker's /metrics concurrently and merges the families by :data:`MERGE_RULES`:

- counters, histograms and summaries add up over workers, label set by label set;
- gauges about one worker (its loop, its queues, its cache, its process) stay one
  series per worker, with a ``worker`` label (the worker's index);
- gauges that state the same machine-wide fact in every worker appear once, from the
  lowest-index worker that answered;
- ``costserve_provisioned_cost_usd_total`` comes from the supervisor alone;
- a family not in the table is summed if cumulative and kept per worker otherwise, so
  a new metric is never counted once per worker by mistake.

Summed counters never go down, so Prometheus never reads a worker's restart as a reset
of the machine's counters: a worker that does not answer adds the values of its last
answered scrape, and when a worker index gets a new pid (its process crashed and was
started again) or is no longer listed, its last values are folded into a retired base
for that index, which every later sum includes. What is lost: a crashed worker's
increments between its last scrape and its end.

Example::

    registry = CollectorRegistry(support_collectors_without_names=True)  # for ?name[]=
    registry.register(WorkerMetrics(supervisor.endpoints, provisioned_usd=cost.provisioned_usd))
    server = start_metrics_server(registry, settings.host, settings.metrics_port, tls=tls)

The supervisor's registry holds no ProcessCollector of its own: the workers'
``process_*`` families come through, labelled, under the same names.
"""

from __future__ import annotations

import enum
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from costserve.server.metrics import _ProvisionedCost

log = logging.getLogger(__name__)

#: Where every worker serves its own /metrics.
WORKER_HOST: Final = "127.0.0.1"
#: The label that tells one worker's series from another's: the worker's index.
WORKER_LABEL: Final = "worker"


class Merge(enum.Enum):
    """How a metric family of the workers becomes the machine's."""

    #: Add up over workers, label set by label set (buckets, ``_sum`` and ``_count`` alike).
    SUM = "sum"
    #: The largest of the workers' cumulative values, label set by label set.
    MAX = "max"
    #: Every worker's series, each with a ``worker`` label.
    PER_WORKER = "per_worker"
    #: The series of the lowest-index worker that answered, without a ``worker`` label.
    ONE = "one"
    #: The supervisor's own value; the workers' copies are dropped.
    SUPERVISOR = "supervisor"


#: How each family is merged, by its exposed name (counters with ``_total``). Families
#: not listed: see :func:`merge_rule`.
MERGE_RULES: Final[Mapping[str, Merge]] = {
    # Every worker computes R from the whole machine's CPU: one figure, which a sum would multiply.
    "costserve_utilization": Merge.ONE,
    # Every worker reads the same price file.
    "costserve_price_usd": Merge.ONE,
    # The machine's vCPUs and memory, which every worker is told.
    "costserve_provisioned": Merge.ONE,
    # Every worker reads the same --budgets.
    "costserve_tenant_budget_usd": Merge.ONE,
    # Every worker serves the same repository: a sum would count each version once per worker.
    "costserve_model_info": Merge.ONE,
    "costserve_model_versions": Merge.ONE,
    # Every worker loads every version, so a version that fails to load fails in each: a sum
    # would count it once per worker, the largest count counts it once.
    "costserve_model_load_failures_total": Merge.MAX,
    # Each worker's is the whole machine's cost since *that worker* started, so neither a sum
    # nor any one worker's is the machine's since start; the supervisor's own is.
    "costserve_provisioned_cost_usd_total": Merge.SUPERVISOR,
    # One event loop per worker: a slow loop must not hide in an average; max() over the
    # worker label is the dashboard's figure.
    "costserve_event_loop_lag_seconds": Merge.PER_WORKER,
    # Each worker sheds from its own latency.
    "costserve_load_shedding": Merge.PER_WORKER,
    # Each worker has its own queues and its own cache (each under --cache-max-mb). The machine's
    # total is `sum without (worker)`, what the dashboard's sums already compute; a machine series
    # beside the workers' would be counted twice by every sum().
    "costserve_queue_depth": Merge.PER_WORKER,
    "costserve_cache_entries": Merge.PER_WORKER,
    "costserve_cache_bytes": Merge.PER_WORKER,
}
#: Rules by name prefix, for families a library adds.
PREFIX_RULES: Final[Mapping[str, Merge]] = {
    # One process each: memory, fds, start time, and process_cpu_seconds_total, a counter that a
    # restart resets whole (to about 0), which rate() reads correctly for its own series.
    "process_": Merge.PER_WORKER,
    # The interpreter's own figures (gc, version), per process too.
    "python_": Merge.PER_WORKER,
}
#: The families that count up over time, as ``text_string_to_metric_families`` types them.
_CUMULATIVE_TYPES: Final = frozenset({"counter", "histogram", "summary"})


def merge_rule(name: str, typ: str) -> Merge:
    """How the family ``name`` (as exposed: a counter with ``_total``) of type ``typ`` merges.

    :data:`MERGE_RULES`, else :data:`PREFIX_RULES`, else counters, histograms and summaries
    :attr:`Merge.SUM` and everything else (gauges, untyped) :attr:`Merge.PER_WORKER`.
    """
    rule = MERGE_RULES.get(name) or next((rule for p, rule in PREFIX_RULES.items() if name.startswith(p)), None)
    if rule is not None:
        return rule
    return Merge.SUM if typ in _CUMULATIVE_TYPES else Merge.PER_WORKER


@dataclass(frozen=True)
class WorkerEndpoint:
    """A running worker: its ``index`` (0 .. N-1, kept across restarts), ``pid`` and /metrics ``port``."""

    index: int
    pid: int
    port: int

    @property
    def url(self) -> str:
        """The worker's /metrics URL."""
        return f"http://{WORKER_HOST}:{self.port}/metrics"


#: A sample: its name and its sorted label pairs.
_SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
#: Cumulative values: family name -> sample -> value.
_Values = dict[str, dict[_SeriesKey, float]]
#: One worker's answer: family name -> family.
_Families = dict[str, Metric]


def _add_into(target: _Values, values: _Values) -> None:
    for name, samples in values.items():
        into = target.setdefault(name, {})
        for key, value in samples.items():
            into[key] = into.get(key, 0.0) + value


@dataclass
class _Slot:
    """What the collector remembers of one worker index."""

    pid: int | None
    #: Cumulative values of the current process at its last answered scrape.
    last: _Values = field(default_factory=dict)
    #: Cumulative values of the index's earlier processes, at their last answered scrapes.
    retired: _Values = field(default_factory=dict)

    def retire(self, pid: int | None) -> None:
        """The process is gone: fold its last values into the base, and expect ``pid`` next."""
        _add_into(self.retired, self.last)
        self.last = {}
        self.pid = pid

    def total(self) -> _Values:
        """Everything this index has counted: the retired base plus the current process's values."""
        total: _Values = {}
        _add_into(total, self.retired)
        _add_into(total, self.last)
        return total


class WorkerMetrics(Collector):
    """A collector of the workers' metrics, merged into the machine's (see the module docstring).

    Args:
        workers: The workers running now; called at every scrape. Indices are unique.
        timeout_s: Seconds each worker has to answer, fetches running concurrently; a worker
            that does not answer in time (or answers an error, or text that does not parse) is
            counted in ``costserve_worker_scrape_failures_total`` and skipped for this scrape.
        provisioned_usd: The machine's provisioned cost since the supervisor started, in USD,
            exported as ``costserve_provisioned_cost_usd_total``. None: not exported.

    Scrapes are serialized (one at a time): two overlapping ones could otherwise store their
    workers' values out of order and make a sum go down.
    """

    def __init__(
        self,
        workers: Callable[[], Sequence[WorkerEndpoint]],
        timeout_s: float = 2.0,
        provisioned_usd: Callable[[], float] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._workers = workers
        self._timeout_s = timeout_s
        self._provisioned = _ProvisionedCost(provisioned_usd) if provisioned_usd is not None else None
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._failures: dict[int, int] = {}
        #: Indices whose last scrape failed.
        self._failing: set[int] = set()
        #: Every family seen: name -> (type, HELP), the lowest-index worker's; first seen first.
        self._families: dict[str, tuple[str, str]] = {}
        # Worker URLs are on loopback: an http_proxy in the environment must not take them elsewhere.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def collect(self) -> list[Metric]:
        """Scrape every worker now and return the merged families."""
        with self._lock:
            endpoints = sorted(self._workers(), key=lambda endpoint: endpoint.index)
            answers = self._scrape(endpoints)
            self._remember(endpoints, answers)
            totals = [self._slots[index].total() for index in sorted(self._slots)]
            merged = [
                _merged(name, typ, help_text, answers, totals)
                for name, (typ, help_text) in self._families.items()
                if _rule(name, typ) is not Merge.SUPERVISOR
            ]
            if self._provisioned is not None:
                merged.extend(self._provisioned.collect())
            merged.append(self._failures_family())
            return merged

    def _scrape(self, endpoints: Sequence[WorkerEndpoint]) -> dict[int, _Families]:
        """The families of every worker that answered in time, by index; the others counted as failures."""
        answers: dict[int, _Families] = {}
        if not endpoints:
            return answers
        executor = ThreadPoolExecutor(len(endpoints), thread_name_prefix="metrics-merge")
        try:
            futures = {endpoint.index: executor.submit(self._fetch, endpoint) for endpoint in endpoints}
            wait(futures.values(), timeout=self._timeout_s)
        finally:
            # A fetch still running ends by its socket timeout; this scrape does not wait for it.
            executor.shutdown(wait=False, cancel_futures=True)
        for endpoint in endpoints:
            future = futures[endpoint.index]
            done = future.done() and not future.cancelled()
            error = future.exception() if done else TimeoutError(f"no answer within {self._timeout_s} s")
            self._failures.setdefault(endpoint.index, 0)
            if error is None:
                answers[endpoint.index] = future.result()
                self._failing.discard(endpoint.index)
                continue
            self._failures[endpoint.index] += 1
            if endpoint.index not in self._failing:  # once per outage, not once per scrape
                self._failing.add(endpoint.index)
                log.warning(
                    "worker %d (pid %d): /metrics not scraped (%s); skipped until it answers",
                    endpoint.index,
                    endpoint.pid,
                    error,
                )
        return answers

    def _fetch(self, endpoint: WorkerEndpoint) -> _Families:
        with self._opener.open(endpoint.url, timeout=self._timeout_s) as response:
            text = response.read().decode()
        return _without_created(text_string_to_metric_families(text))

    def _remember(self, endpoints: Sequence[WorkerEndpoint], answers: Mapping[int, _Families]) -> None:
        """Update each index's slot (restarts and removals retired) and the families seen."""
        listed = {endpoint.index: endpoint.pid for endpoint in endpoints}
        for index, slot in self._slots.items():
            if listed.get(index) != slot.pid:
                slot.retire(listed.get(index))
        for endpoint in endpoints:
            slot = self._slots.setdefault(endpoint.index, _Slot(endpoint.pid))
            if endpoint.index in answers:
                slot.last = self._cumulative(answers[endpoint.index])
        helps: dict[str, tuple[str, str]] = {}
        for index in sorted(answers):
            for name, family in answers[index].items():
                helps.setdefault(name, (family.type, family.documentation))
        self._families.update(helps)

    @staticmethod
    def _cumulative(families: Mapping[str, Metric]) -> _Values:
        """The values of ``families`` that merge by :attr:`Merge.SUM` or :attr:`Merge.MAX`."""
        values: _Values = {}
        for name, family in families.items():
            if _rule(name, family.type) in (Merge.SUM, Merge.MAX):
                values[name] = {
                    (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for sample in family.samples
                    # Quantiles of different processes do not add up.
                    if "quantile" not in sample.labels
                }
        return values

    def _failures_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "costserve_worker_scrape_failures",
            "Scrapes of a worker's /metrics that got no usable answer in time, by worker index.",
            labels=[WORKER_LABEL],
        )
        for index in sorted(self._failures):
            family.add_metric([str(index)], self._failures[index])
        return family


def _rule(name: str, typ: str) -> Merge:
    """:func:`merge_rule` for a family as parsed (a counter without ``_total``)."""
    return merge_rule(name + "_total" if typ == "counter" else name, typ)


def _merged(name: str, typ: str, help_text: str, answers: Mapping[int, _Families], totals: list[_Values]) -> Metric:
    """The machine's family ``name``: from this scrape's ``answers`` by index, or from the indices' ``totals``."""
    rule = _rule(name, typ)
    merged = Metric(name, help_text, typ)
    if rule in (Merge.SUM, Merge.MAX):
        combined: dict[_SeriesKey, float] = {}
        for total in totals:
            for key, value in total.get(name, {}).items():
                if key not in combined:
                    combined[key] = value
                elif rule is Merge.SUM:
                    combined[key] += value
                else:
                    combined[key] = max(combined[key], value)
        for (sample_name, label_pairs), value in combined.items():
            merged.add_sample(sample_name, dict(label_pairs), value)
        return merged
    sources = [(index, families[name]) for index, families in sorted(answers.items()) if name in families]
    if rule is Merge.ONE:
        sources = sources[:1]
    for index, family in sources:
        for sample in family.samples:
            labels = {**sample.labels, WORKER_LABEL: str(index)} if rule is Merge.PER_WORKER else sample.labels
            merged.add_sample(sample.name, labels, sample.value)
    return merged


def _without_created(families: Iterable[Metric]) -> _Families:
    """``families`` by name, without creation times.

    A counter's or histogram's ``_created`` is its process's start of counting; the merged
    series outlive any one worker, and a worker's creation time would tell Prometheus that
    the machine's series started again.
    """
    parsed = {family.name: family for family in families}
    created = {name + "_created" for name, family in parsed.items() if family.type in _CUMULATIVE_TYPES}
    kept: _Families = {}
    for name, family in parsed.items():
        if name in created:
            continue
        family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
        kept[name] = family
    return kept
