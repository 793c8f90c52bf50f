"""Fuzzing every RPC of a real server: never INTERNAL or UNKNOWN, every call counted.

The cases are hypothesis-drawn requests for every field of every RPC and raw garbage
to every method (see :mod:`benchmarks.fuzz`); ``make bench-reliability`` runs the same
fuzzing with thousands of cases against a server subprocess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from benchmarks.fuzz import FORBIDDEN, case_counts, extreme_cases, run_fuzz

#: Methods whose every call costserve_requests_total counts, by the fuzzer's name: (protocol, method).
COUNTED = {
    "Predict": ("v1", "Predict"),
    "PredictStream": ("v1", "PredictStream"),
    "GetModelInfo": ("v1", "GetModelInfo"),
    "v2.ModelInfer": ("v2", "ModelInfer"),
    "v2.ModelMetadata": ("v2", "ModelMetadata"),
    "tfs.Predict": ("tfserving", "Predict"),
    "tfs.GetModelMetadata": ("tfserving", "GetModelMetadata"),
    "tfs.GetModelStatus": ("tfserving", "GetModelStatus"),
}
CASES = 400
SEED = 20261130


def counted_by_server(server: Any, protocol: str, method: str) -> Counter:
    """costserve_requests_total for ``method`` of ``protocol``, summed over models and precisions, by code."""
    label_sets = [
        sample.labels
        for family in server.registry.collect()
        for sample in family.samples
        if sample.name == "costserve_requests_total"
        and sample.labels.get("method") == method
        and sample.labels.get("protocol") == protocol
    ]
    counts: Counter = Counter()
    for labels in label_sets:
        counts[labels["code"]] += int(server.metric("costserve_requests_total", labels))
    return +counts


@pytest.mark.slow
def test_fuzzing_every_rpc_gets_no_internal_or_unknown_and_every_call_is_counted(
    start_server: Callable[..., Any],
) -> None:
    server = start_server()
    report = run_fuzz(server.target, cases=CASES, seed=SEED)

    failures = "\n".join(
        f"  {rpc} -> {status}: {what} | server said: {message}" for rpc, status, what, message in report.failures
    )
    assert report.forbidden == 0, (
        f"{report.forbidden} of {report.cases} calls ended {' or '.join(FORBIDDEN)} "
        f"(seed {SEED}; first {len(report.failures)}):\n{failures}"
    )
    assert report.without_status == 0, f"{report.without_status} calls ended without a gRPC status:\n{failures}"
    assert report.cases == sum(case_counts(CASES).values()) + len(extreme_cases()), report.to_dict()
    assert report.final_predict == "OK", f"after the fuzzing a valid Predict got {report.final_predict}"

    for method, (protocol, counted_as) in COUNTED.items():
        client = Counter(report.statuses[method])
        if method == "Predict":
            client["OK"] += 1  # the valid Predict sent after the fuzzing
        # A message over --max-message-bytes is refused by gRPC itself before any handler
        # runs, so no server code can count it.
        client -= report.over_limit[method]
        server_counts = counted_by_server(server, protocol, counted_as)
        if method == "PredictStream":
            # A stream may be counted once per request it carried: at least once per call, by its outcome.
            short = {
                code: (count, server_counts[code]) for code, count in client.items() if server_counts[code] < count
            }
            assert not short, f"PredictStream calls not counted by the server (client count, server count): {short}"
        else:
            assert server_counts == +client, (
                f"costserve_requests_total{{method={method!r}}} by code {dict(server_counts)} != "
                f"the statuses the client got {dict(client)}"
            )
