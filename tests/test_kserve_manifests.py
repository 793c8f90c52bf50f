"""The KServe manifests (deploy/kserve/): valid for KServe and Kubernetes, and in step with costserve.

Offline: nothing is downloaded. Three checks, each shown to reject a broken manifest:

1. The ServingRuntime and the InferenceService against the ``openAPIV3Schema`` of KServe's
   CRDs, vendored in deploy/kserve/schemas/ (their README says from which release, and how
   to refresh them). kubernetes-validate knows only Kubernetes' built-in kinds, so the CRD
   schemas are checked with jsonschema, turned into JSON Schema as strictly as the API server
   with kubectl's default ``--validate=strict`` reads them: a field the schema does not name
   is an error (where the schema does not preserve unknown fields), int-or-string is either,
   int32/int64 are range-checked, list-type map/set entries must be unique.
2. What the API server checks outside a CRD's schema, and the built-in kinds, with
   kubernetes-validate's strict schemas of the Kubernetes version KServe is built against:
   each object's metadata, the price ConfigMap, and the predictor pod KServe makes of the
   runtime and the InferenceService.
3. The contract between the manifests, KServe and costserve: runtime selection (model
   format, autoSelect, protocol) as KServe does it; the container's arguments parsed by
   ``costserve-server``'s own parser and settings; ports, probe, metrics, model mount, price
   file, user and drain time agreeing with the arguments, the Dockerfile and each other.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT
from pydantic import ValidationError

from costserve.server.cli import build_parser
from costserve.server.cost import PriceFileError, load_prices
from costserve.server.settings import Settings, describe_problems, flag, settings_from_args

KSERVE_DIR = REPO_ROOT / "deploy" / "kserve"
SCHEMA_DIR = KSERVE_DIR / "schemas"
#: KServe release the vendored CRD schemas come from (deploy/kserve/schemas/README.md).
KSERVE_RELEASE = "v0.20.0"
#: Kubernetes API the built-in objects are checked against: KServe v0.20.0 builds on k8s.io/api v0.34.
KUBERNETES_VERSION = "1.34"
#: Where KServe's storage initializer puts the storageUri (constants.DefaultModelLocalMountPath).
MODEL_MOUNT = "/mnt/models"
#: The runtime container KServe merges the InferenceService's predictor.model into.
PREDICTOR_CONTAINER = "kserve-container"
#: Fields of predictor.model that are KServe's, not the container's.
MODEL_ONLY_FIELDS = {"modelFormat", "protocolVersion", "runtime", "runtimeVersion", "storageUri", "storage"}
#: Fields of the predictor that are KServe's (ComponentExtensionSpec, the model, the frameworks), not the pod's.
NOT_POD_FIELDS = {
    *("model", "name", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling"),
    *("containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations"),
    *("deploymentStrategy", "storageUris", "storageContainerName", "workerSpec"),
    *("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm", "paddle"),
}
#: OpenAPI keywords the conversion understands; any other fails the conversion (a refresh may bring some).
KNOWN_KEYWORDS = {
    *("type", "properties", "required", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"),
    *("format", "default", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength"),
    *("minItems", "maxItems", "description", "nullable"),
    *("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"),
    *("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"),
}
#: The vendored schema of each KServe kind, and the manifests by role.
SCHEMA_FILES = {"ServingRuntime": "servingruntime.json", "InferenceService": "inferenceservice.json"}
MANIFESTS = {"runtime": "servingruntime.yaml", "isvc": "inferenceservice.yaml", "prices": "prices.yaml"}

# --- 1. KServe's CRD schemas ------------------------------------------------------------------


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, as strict as the API server.

    Unknown fields are refused (``additionalProperties: false``) wherever the schema names
    properties and does not set ``x-kubernetes-preserve-unknown-fields``: the API server
    prunes them, and kubectl's default ``--validate=strict`` makes that an error. ``nullable``
    admits null; int-or-string admits either. CEL rules (``x-kubernetes-validations``) and any
    other keyword are refused here rather than silently not checked.
    """
    unknown = set(schema) - KNOWN_KEYWORDS
    if unknown:
        raise NotImplementedError(f"the schema conversion does not handle {sorted(unknown)}")
    converted = dict(schema)
    if "properties" in schema:
        converted["properties"] = {name: to_json_schema(child) for name, child in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            converted["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            converted[key] = to_json_schema(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            converted[key] = [to_json_schema(child) for child in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        converted["type"] = [schema["type"], "null"]
    return converted


def _unique_list_entries(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-type``: ``set`` entries, and ``map`` entries' keys, are unique."""
    if list_type not in ("set", "map") or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    defaults = {key: schema.get("items", {}).get("properties", {}).get(key, {}).get("default") for key in keys}
    seen: set[str] = set()
    for entry in instance:
        if list_type == "map":
            if not isinstance(entry, dict):
                continue
            identity = json.dumps({key: entry.get(key, defaults[key]) for key in keys}, sort_keys=True)
        else:
            identity = json.dumps(entry, sort_keys=True)
        if identity in seen:
            yield jsonschema.ValidationError(f"duplicate entry {identity} in a list of type {list_type}")
        seen.add(identity)


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-type": _unique_list_entries}
)


@cache
def vendored(kind: str) -> dict[str, Any]:
    """The vendored CRD document of ``kind``: its source, group, version, kind and schema."""
    document: dict[str, Any] = json.loads((SCHEMA_DIR / SCHEMA_FILES[kind]).read_text(encoding="utf-8"))
    return document


@cache
def crd_validator(kind: str) -> Any:
    """A validator of ``kind`` (a kind of KServe's) against its vendored CRD schema."""
    return CRDValidator(to_json_schema(vendored(kind)["openAPIV3Schema"]), format_checker=FORMATS)


def _path(parts: Any) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts) or "."


def crd_errors(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """What KServe's CRD schema finds wrong with ``manifest``: (path, message) pairs; empty when valid."""
    kind = manifest.get("kind")
    if kind not in SCHEMA_FILES:
        return [(".kind", f"{kind!r} is not a kind whose CRD is vendored ({sorted(SCHEMA_FILES)})")]
    source = vendored(kind)
    errors = [(_path(error.absolute_path), error.message) for error in crd_validator(kind).iter_errors(manifest)]
    if manifest.get("apiVersion") != f"{source['group']}/{source['version']}":
        errors.append((".apiVersion", f"{manifest.get('apiVersion')!r}: the CRD serves {source['version']} only"))
    return sorted(errors)


# --- 2. Kubernetes' own schemas ---------------------------------------------------------------


def kubernetes_errors(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """What kubernetes-validate (strict) finds wrong with a built-in object; empty when valid."""
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [(_path(error.path), error.message)]
    return []


def metadata_errors(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The object's metadata against Kubernetes' ObjectMeta, which the API server checks for every kind.

    A CRD's schema says only ``metadata: {type: object}``; kubernetes-validate checks
    ObjectMeta as part of a built-in kind, here a ConfigMap that has nothing else.
    """
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest.get("metadata")}
    return kubernetes_errors(probe)


def _container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in runtime["spec"]["containers"] if c.get("name") == PREDICTOR_CONTAINER]
    return dict(container)


def predictor_pod(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The predictor pod KServe v0.20.0 makes of the runtime and the InferenceService, as far as these use.

    As pkg/controller/v1beta1/inferenceservice/components/predictor.go does: the runtime's
    kserve-container with predictor.model's container fields merged in (its ``args``
    appended to the runtime's, other fields replacing), the runtime's volumes, the
    predictor's pod fields, and the annotations and labels of the runtime, the
    InferenceService and the predictor (later ones win). Not modelled: what KServe's pod
    webhook adds (the storage initializer and its /mnt/models mount).
    """
    predictor = isvc["spec"]["predictor"]
    model = {key: value for key, value in predictor.get("model", {}).items() if key not in MODEL_ONLY_FIELDS}
    container = _container(runtime)
    args = [*container.get("args", []), *model.get("args", [])]
    container.update(model)
    container["name"] = PREDICTOR_CONTAINER
    if args:
        container["args"] = args
    spec: dict[str, Any] = {"containers": [container]}
    for field in ("volumes", "nodeSelector", "tolerations", "affinity", "imagePullSecrets", "schedulerName"):
        if field in runtime["spec"]:
            spec[field] = runtime["spec"][field]
    spec.update({key: value for key, value in predictor.items() if key not in NOT_POD_FIELDS})
    annotations = {
        **runtime["spec"].get("annotations", {}),
        **isvc["metadata"].get("annotations", {}),
        **predictor.get("annotations", {}),
    }
    labels = {**runtime["spec"].get("labels", {}), **isvc["metadata"].get("labels", {}), **predictor.get("labels", {})}
    metadata = {"name": f"{isvc['metadata']['name']}-predictor", "annotations": annotations, "labels": labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


# --- 3. The contract with KServe and costserve -----------------------------------------------


def runtime_selected(runtime: dict[str, Any], isvc: dict[str, Any]) -> bool:
    """Whether KServe gives the InferenceService this runtime, as ModelSpec.GetSupportingRuntimes decides.

    Not disabled, single-model, a supported format whose label (``mt:NAME`` or
    ``mt:NAME:VERSION``) matches the model's (only autoSelect formats when the
    InferenceService names no runtime), and the model's protocol (default v1) among the
    runtime's (any, when it lists none).
    """
    spec, model = runtime["spec"], isvc["spec"]["predictor"]["model"]
    if spec.get("disabled") or spec.get("multiModel"):
        return False
    named = model.get("runtime")
    if named is not None and named != runtime["metadata"]["name"]:
        return False
    labels = set()
    for supported in spec.get("supportedModelFormats", []):
        if named is not None or supported.get("autoSelect"):
            labels.add(f"mt:{supported['name']}")
            if "version" in supported:
                labels.add(f"mt:{supported['name']}:{supported['version']}")
    model_format = model["modelFormat"]
    wanted = f"mt:{model_format['name']}" + (f":{model_format['version']}" if "version" in model_format else "")
    protocols = spec.get("protocolVersions") or []
    return wanted in labels and (not protocols or model.get("protocolVersion", "v1") in protocols)


def parse_serve(args: list[str]) -> Settings | str:
    """``costserve-server ARGS`` as the image runs it: the Settings, or why they are refused.

    The real parser (build_parser) and the real validation (settings_from_args), with no
    COSTSERVE_* variable from this process. argparse would take a flag's unambiguous
    abbreviation (``--model-repo``); a manifest must spell each flag out, so that a flag
    renamed in costserve shows up here.
    """
    if not args or args[0] != "serve":
        return f"the arguments must start with the serve command, got {args[:1]}"
    flags = {flag(name) for name in Settings.model_fields}
    for arg in args[1:]:
        if arg.startswith("--") and arg.split("=", 1)[0] not in flags:
            return f"{arg.split('=', 1)[0]} is not a flag of costserve-server serve"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = build_parser().parse_args(args)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    try:
        return settings_from_args(parsed)
    except ValidationError as error:
        return "; ".join(describe_problems(error))


def _dockerfile_final_stage() -> dict[str, str]:
    """The runtime stage's USER and ENTRYPOINT (the last of each after the last FROM)."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stage = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) :]
    found = {}
    for line in stage:
        keyword, _, value = line.partition(" ")
        found[keyword.upper()] = value.strip()
    return found


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (``2``, ``500m``, ``2Gi``, ``1G``) as a number."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in (*suffixes, ""), f"not a quantity this test reads: {value!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


def contract_problems(runtime: dict[str, Any], isvc: dict[str, Any], prices: dict[str, Any]) -> list[str]:
    """Where the manifests disagree with KServe, costserve, the Dockerfile or each other; empty when none."""
    problems: list[str] = []
    model = isvc["spec"]["predictor"]["model"]
    if model.get("protocolVersion") != "grpc-v2":
        problems.append(f"predictor.model.protocolVersion is {model.get('protocolVersion')!r}, not grpc-v2")
    if runtime["spec"].get("protocolVersions") != ["grpc-v2"]:
        problems.append(f"the runtime's protocolVersions are {runtime['spec'].get('protocolVersions')}, not [grpc-v2]")
    if not runtime_selected(runtime, isvc):
        problems.append(f"KServe would not pick runtime {runtime['metadata']['name']} for {model.get('modelFormat')}")
    if not model.get("storageUri"):
        problems.append("predictor.model.storageUri is missing: nothing would be mounted at " + MODEL_MOUNT)

    pod = predictor_pod(runtime, isvc)
    container = pod["spec"]["containers"][0]
    if "command" in container:
        problems.append("the container sets command: the image's ENTRYPOINT, costserve-server, must take the args")
    settings = parse_serve(container.get("args", []))
    if isinstance(settings, str):
        return [*problems, f"costserve-server refuses the container's args: {settings}"]

    ports = container.get("ports", [])
    if not ports or ports[0].get("name") != "h2c" or ports[0].get("containerPort") != settings.port:
        problems.append(f"the first container port must be h2c on --port {settings.port}, got {ports[:1]}")
    probe_port = container.get("readinessProbe", {}).get("grpc", {}).get("port")
    if probe_port != settings.port:
        problems.append(
            f"the readiness probe checks gRPC health on {probe_port}, the server listens on {settings.port}"
        )
    if settings.host != "0.0.0.0":
        problems.append(f"--host {settings.host} is not reachable from outside the pod")
    if str(settings.model_repository) != MODEL_MOUNT or settings.model_dir is not None:
        problems.append(f"--model-repository must be {MODEL_MOUNT} (the storageUri), got {settings.model_repository}")

    annotations = pod["metadata"]["annotations"]
    metrics_ports = {
        "--metrics-port": settings.metrics_port,
        "prometheus.kserve.io/port": annotations.get("prometheus.kserve.io/port"),
        "prometheus.io/port": annotations.get("prometheus.io/port"),
        "the port named metrics": next((p["containerPort"] for p in ports if p.get("name") == "metrics"), None),
    }
    if {str(port) for port in metrics_ports.values()} != {str(settings.metrics_port)}:
        problems.append(f"the metrics port differs: {metrics_ports}")
    for key in ("prometheus.kserve.io/path", "prometheus.io/path"):
        if annotations.get(key) != "/metrics":
            problems.append(f"{key} is {annotations.get(key)!r}; costserve serves /metrics only")
    mode = isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    if mode not in ("Standard", "RawDeployment"):
        problems.append(f"deploymentMode {mode!r}: only Standard (a Deployment) takes two container ports")
    if annotations.get("serving.kserve.io/enable-prometheus-scraping") != "false":
        problems.append("enable-prometheus-scraping must be 'false': else KServe points prometheus.io/port at 9091")

    user = _dockerfile_final_stage()
    uid, _, gid = user["USER"].partition(":")
    security = container.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or str(security.get("runAsUser")) != uid or uid == "0":
        problems.append(f"runAsUser must be the image's non-root USER {uid}, got {security}")
    if gid and str(security.get("runAsGroup")) != gid:
        problems.append(f"runAsGroup must be the image's group {gid}, got {security.get('runAsGroup')}")
    if json.loads(user["ENTRYPOINT"]) != ["costserve-server"]:
        problems.append(f"the image's ENTRYPOINT is {user['ENTRYPOINT']}, not costserve-server")

    drain = settings.drain_grace_seconds + settings.drain_seconds
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        problems.append(f"terminationGracePeriodSeconds {grace} does not cover the drain ({drain:g} s)")

    problems += _price_problems(settings, container, pod, prices)
    return problems


def _price_problems(
    settings: Settings, container: dict[str, Any], pod: dict[str, Any], prices: dict[str, Any]
) -> list[str]:
    """The price file is the ConfigMap's, prices what the container is given, at deploy/prices.toml's prices."""
    if settings.prices is None:
        return ["--prices is not set: costserve would price an n2-standard-2, not the pod"]
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    volume = volumes.get(mounts.get(str(settings.prices.parent), ""), {})
    if volume.get("configMap", {}).get("name") != prices["metadata"]["name"]:
        return [f"--prices {settings.prices} is not on a mount of ConfigMap {prices['metadata']['name']}"]
    text = prices.get("data", {}).get(settings.prices.name)
    if text is None:
        return [f"ConfigMap {prices['metadata']['name']} has no key {settings.prices.name}"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / settings.prices.name
        path.write_text(text, encoding="utf-8")
        try:
            loaded = load_prices(path)
        except PriceFileError as error:
            return [f"costserve refuses the price file: {error}"]
    reference = load_prices(REPO_ROOT / "deploy" / "prices.toml")
    problems = []
    limits = container.get("resources", {}).get("limits", {})
    if not math.isclose(loaded.vcpus, _quantity(limits.get("cpu", 0))):
        problems.append(f"the price file provisions {loaded.vcpus} vCPUs, the container's limit is {limits.get('cpu')}")
    if not math.isclose(loaded.memory_gb * 2**30, _quantity(limits.get("memory", 0))):
        problems.append(f"the price file provisions {loaded.memory_gb} GiB, the limit is {limits.get('memory')}")
    for field in ("vcpu_hour_usd", "memory_gb_hour_usd", "network_gb_usd", "window_seconds", "min_utilization"):
        if getattr(loaded, field) != getattr(reference, field):
            problems.append(f"{field} is {getattr(loaded, field)}, deploy/prices.toml says {getattr(reference, field)}")
    return problems


# --- fixtures and helpers ---------------------------------------------------------------------


def load_manifest(name: str) -> dict[str, Any]:
    """The one object of deploy/kserve/NAME."""
    documents = [doc for doc in yaml.safe_load_all((KSERVE_DIR / name).read_text(encoding="utf-8")) if doc]
    assert len(documents) == 1, f"{name} holds {len(documents)} objects, expected one"
    document: dict[str, Any] = documents[0]
    return document


@pytest.fixture(autouse=True)
def _no_costserve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifests' arguments alone decide the settings: no COSTSERVE_* variable of this process."""
    for variable in list(os.environ):
        if variable.upper().startswith("COSTSERVE_"):
            monkeypatch.delenv(variable)


@pytest.fixture
def manifests() -> dict[str, dict[str, Any]]:
    """Fresh copies of the three manifests, by role: runtime, isvc, prices."""
    return {role: load_manifest(name) for role, name in MANIFESTS.items()}


def mutated(document: dict[str, Any], path: Sequence[str | int], value: Any) -> dict[str, Any]:
    """A copy of ``document`` with the value at ``path`` replaced (``DELETE``: removed)."""
    copied = copy.deepcopy(document)
    parent: Any = copied
    for part in path[:-1]:
        parent = parent[part]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copied


DELETE = object()
CONTAINER = ["spec", "containers", 0]
MODEL = ["spec", "predictor", "model"]


# --- tests -------------------------------------------------------------------------------------


def test_vendored_schemas_are_kserves_release() -> None:
    for kind, (group, version) in {
        "ServingRuntime": ("serving.kserve.io", "v1alpha1"),
        "InferenceService": ("serving.kserve.io", "v1beta1"),
    }.items():
        source = vendored(kind)
        assert (source["group"], source["version"], source["kind"]) == (group, version, kind)
        assert source["source"]["ref"] == KSERVE_RELEASE, "refreshed schemas: update KSERVE_RELEASE and docs/kserve.md"
        assert KSERVE_RELEASE in (SCHEMA_DIR / "README.md").read_text(encoding="utf-8")


def test_runtime_and_inference_service_match_kserves_crd_schemas(manifests: dict[str, dict[str, Any]]) -> None:
    for role in ("runtime", "isvc"):
        assert crd_errors(manifests[role]) == [], MANIFESTS[role]


def test_metadata_and_built_in_objects_match_kubernetes_schemas(manifests: dict[str, dict[str, Any]]) -> None:
    for role, manifest in manifests.items():
        assert metadata_errors(manifest) == [], MANIFESTS[role]
    assert manifests["prices"]["kind"] == "ConfigMap"
    assert kubernetes_errors(manifests["prices"]) == []
    assert kubernetes_errors(predictor_pod(manifests["runtime"], manifests["isvc"])) == []


def test_manifests_agree_with_kserve_costserve_and_each_other(manifests: dict[str, dict[str, Any]]) -> None:
    assert contract_problems(manifests["runtime"], manifests["isvc"], manifests["prices"]) == []


@pytest.mark.parametrize(
    ("role", "path", "value", "error_path"),
    [
        # Misspelled fields: the schema names every field here, so an unknown one is an error.
        ("runtime", ["specs"], {}, "."),
        ("runtime", ["spec", "supportedModelFormats", 0, "autoselect"], True, ".spec.supportedModelFormats[0]"),
        ("runtime", [*CONTAINER, "readinessProbe", "grpc", "prot"], 8081, ".spec.containers[0].readinessProbe.grpc"),
        ("isvc", [*MODEL, "storageURI"], "pvc://costserve-models/repository", ".spec.predictor.model"),
        # Wrong types and values.
        ("runtime", [*CONTAINER, "ports", 0, "containerPort"], "8081", ".spec.containers[0].ports[0].containerPort"),
        ("runtime", [*CONTAINER, "ports", 0, "containerPort"], 2**31, ".spec.containers[0].ports[0].containerPort"),
        ("runtime", ["spec", "protocolVersions"], "grpc-v2", ".spec.protocolVersions"),
        ("runtime", ["spec", "supportedModelFormats", 0, "priority"], 0, ".spec.supportedModelFormats[0].priority"),
        ("runtime", ["spec", "annotations", "prometheus.io/port"], 8000, ".spec.annotations.prometheus.io/port"),
        ("runtime", [*CONTAINER, "resources", "limits", "cpu"], "two", ".spec.containers[0].resources.limits.cpu"),
        ("isvc", ["spec", "predictor", "minReplicas"], "1", ".spec.predictor.minReplicas"),
        # Required fields, and a duplicate key in a list-type map.
        ("runtime", [*CONTAINER, "readinessProbe", "grpc", "port"], DELETE, ".spec.containers[0].readinessProbe.grpc"),
        ("isvc", [*MODEL, "modelFormat", "name"], DELETE, ".spec.predictor.model.modelFormat"),
        ("isvc", ["spec", "predictor"], DELETE, ".spec"),
        ("runtime", [*CONTAINER, "ports", 1, "containerPort"], 8081, ".spec.containers[0].ports"),
    ],
)
def test_crd_schema_rejects_a_broken_manifest(
    manifests: dict[str, dict[str, Any]], role: str, path: Sequence[str | int], value: Any, error_path: str
) -> None:
    broken = mutated(manifests[role], path, value)
    errors = crd_errors(broken)
    assert error_path in [where for where, _ in errors], f"expected an error at {error_path}, got {errors}"


def test_kubernetes_schemas_reject_broken_metadata_and_built_in_objects(
    manifests: dict[str, dict[str, Any]],
) -> None:
    # YAML's unquoted false is a boolean; annotation values must be strings.
    annotation = ["metadata", "annotations", "serving.kserve.io/enable-prometheus-scraping"]
    errors = metadata_errors(mutated(manifests["isvc"], annotation, False))
    assert [where for where, _ in errors] == [".metadata.annotations.serving.kserve.io/enable-prometheus-scraping"]
    errors = kubernetes_errors(mutated(manifests["prices"], ["data", "prices.toml"], {"vcpus": 2}))
    assert [where for where, _ in errors] == [".data.prices.toml"]
    pod = predictor_pod(manifests["runtime"], manifests["isvc"])
    errors = kubernetes_errors(mutated(pod, ["spec", "containers", 0, "securityContext", "runAsUsr"], 10001))
    assert [where for where, _ in errors] == [".spec.containers[0].securityContext"]


@pytest.mark.parametrize(
    ("role", "path", "value", "problem"),
    [
        ("runtime", [*CONTAINER, "args", 3], "--metrics-prot=8000", "--metrics-prot is not a flag"),
        ("runtime", [*CONTAINER, "args", 4], "--model-repo=/mnt/models", "--model-repo is not a flag"),
        ("runtime", [*CONTAINER, "args", 2], "--port=eighty", "--port (COSTSERVE_PORT): must be a whole number"),
        ("runtime", [*CONTAINER, "args", 2], "--port", "argument --port: expected one argument"),
        ("runtime", [*CONTAINER, "args", 0], "train", "must start with the serve command"),
        ("runtime", [*CONTAINER, "args", 2], "--port=8082", "the first container port must be h2c"),
        ("runtime", [*CONTAINER, "ports", 0, "name"], "grpc-v2", "the first container port must be h2c"),
        ("runtime", [*CONTAINER, "readinessProbe", "grpc", "port"], 8000, "the readiness probe checks gRPC"),
        ("runtime", [*CONTAINER, "args", 4], "--model-repository=/models", "--model-repository must be /mnt/models"),
        ("runtime", ["spec", "annotations", "prometheus.kserve.io/port"], "8080", "the metrics port differs"),
        ("runtime", ["spec", "protocolVersions"], ["v2"], "KServe would not pick runtime"),
        ("runtime", ["spec", "supportedModelFormats", 0, "autoSelect"], False, "KServe would not pick runtime"),
        ("isvc", [*MODEL, "modelFormat", "name"], "tensorflow", "KServe would not pick runtime"),
        ("isvc", [*MODEL, "protocolVersion"], DELETE, "protocolVersion is None"),
        ("isvc", ["metadata", "annotations", "serving.kserve.io/enable-prometheus-scraping"], "true", "9091"),
        ("runtime", [*CONTAINER, "securityContext", "runAsUser"], 1000, "runAsUser must be the image's"),
        ("runtime", [*CONTAINER, "command"], ["python"], "the container sets command"),
        ("isvc", ["spec", "predictor", "terminationGracePeriodSeconds"], 30, "does not cover the drain"),
        ("runtime", [*CONTAINER, "resources", "limits", "memory"], "4Gi", "the price file provisions 2.0 GiB"),
        ("prices", ["data", "prices.toml"], "[provisioned]\nvcpus = 0\n", "costserve refuses the price file"),
    ],
)
def test_contract_check_catches_a_mismatch(
    manifests: dict[str, dict[str, Any]], role: str, path: Sequence[str | int], value: Any, problem: str
) -> None:
    manifests[role] = mutated(manifests[role], path, value)
    problems = contract_problems(manifests["runtime"], manifests["isvc"], manifests["prices"])
    assert any(problem in found for found in problems), f"expected {problem!r} among {problems}"
