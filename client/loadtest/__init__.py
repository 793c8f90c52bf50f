"""``costserve loadtest``: drive a costserve server and report what the load got and what it cost.

::

    costserve loadtest [--target HOST:PORT] [--concurrency N | --rate R | --sweep-concurrency 1,4,16 | --sweep-rate ...]
                       [--duration S | --requests N] [--warmup S] [--arrivals poisson|constant]
                       [--repeat FRACTION | --repeat zipf:S] [--images-per-request K] [--precision P]
                       [--deadline-ms MS] [--skip-cache] [--protocol v1|v2|tfserving] [--stream]
                       [--processes N] [--channels N]
                       [--model NAME] [--version V] [--inputs DIR]
                       [--json [FILE]] [--csv [FILE]] [--plot FILE.png]
                       [--token TOKEN] [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]

``--token`` (env ``COSTSERVE_TOKEN``) is the bearer token every call carries, for a server that
authenticates its callers; the JSON report says only whether one was set. It and the TLS flags
are costserve's global options, which may also follow ``loadtest``.

Load shapes. *Closed loop* (``--concurrency N``): N callers, each sends its next
request when the previous one is answered. *Open loop* (``--rate R``): requests
leave on a schedule (Poisson or evenly spaced arrivals at R per second) whether or
not earlier ones were answered, and each latency counts from the time the request
*should* have left, so a stalled server or a lagging generator cannot hide queueing
(no coordinated omission). A sweep runs one step per value and reports one row each.

Inputs. The server's held-out digits (scikit-learn's bundled digits, split exactly as
the server's training does), so every answer is checked against a known label. Past
the 360 held-out images, variants shifted by a pixel and with one corner pixel
XOR-ed with a small value keep the inputs distinct and their labels known. Each
input is serialized once; a request is the concatenation of its inputs' bytes and a
prepared tail (protobuf's wire format merges concatenated messages), sent through
``grpc.aio`` channels that skip request serialization. The tail names the model and
version asked (``--model``, ``--version``).

Protocols. ``--protocol v1`` (the default) sends costserve.v1 ``Predict`` calls (or, with
``--stream``, ``PredictStream``); ``v2`` the Open Inference Protocol's ``ModelInfer`` with the
images as one raw tensor; ``tfserving`` TensorFlow Serving's ``Predict``. The same inputs and
loops, and the same report, as far as each protocol's answers tell (TF Serving's say neither
cache hits nor the variant).

``--inputs DIR`` sends your own PNG/JPEG files instead, as encoded bytes: one sub-folder
per class (ImageFolder layout; an answer is correct when its ``label_name`` is the folder
name) or a flat folder (no labels, so no accuracy).

``--repeat F`` makes a fraction F of the images repeat an input whose answer this
process already received (so, with the cache on, about F of the images are cache
hits); ``--repeat zipf:S`` draws every image from a catalog of ``--catalog`` inputs
by Zipf popularity with exponent S.

Several processes (``--processes N``, "spawn" start method) share the load; their
raw latency samples are pooled, so the percentiles are those of all requests, never
averages of per-process percentiles.

The parts, one module each: :mod:`~costserve.loadtest.config` (settings),
:mod:`~costserve.loadtest.inputs` (held-out digits and their variants, or a folder's files),
:mod:`~costserve.loadtest.protocols` (each protocol's requests and answers),
:mod:`~costserve.loadtest.transports` (unary and stream calls),
:mod:`~costserve.loadtest.generator` (one process's closed- and open-loop engines),
:mod:`~costserve.loadtest.samples` (raw samples, their pooling, percentiles),
:mod:`~costserve.loadtest.runner` (one process or several),
:mod:`~costserve.loadtest.report` (results, table, JSON, CSV, plot) and
:mod:`~costserve.loadtest.cli` (the command).

Example::

    from costserve.loadtest import LoadtestConfig, run_loadtest

    report = run_loadtest(LoadtestConfig(target="127.0.0.1:50051", concurrency=(1, 4, 16), requests=1000))
    for step in report.steps:
        print(step.summary()["latency_ms"]["p99"])
"""

from costserve.loadtest.cli import add_arguments, main
from costserve.loadtest.config import LoadtestConfig, RepeatSpec
from costserve.loadtest.report import LoadReport
from costserve.loadtest.runner import LoadGeneratorFailed, run_loadtest

__all__ = ["LoadGeneratorFailed", "LoadReport", "LoadtestConfig", "RepeatSpec", "add_arguments", "main", "run_loadtest"]
