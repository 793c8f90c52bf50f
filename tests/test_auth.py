"""Authentication and tenants: API keys, JWT bearer tokens and client certificates, against real servers.

Every kind of credential is tried as a hostile caller would: none, bad ones, and a valid
one naming another tenant in every spelling (``ACME``, ``acme ``, unknown, empty, two
headers). Spend is read from the server's own counters: it must land on the caller's
tenant and never move another's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton
from conftest import EXAMPLES, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from pki import Pki, make_pki
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from costserve import TlsFiles
from costserve.client import predict_request, secure_or_plain_channel
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import inference_pb2_grpc as v2_grpc
from costserve.server.auth import (
    Identity,
    JwtVerifier,
    Role,
    add_key,
    normalize_tenant,
    read_keys,
    revoke_key,
)
from costserve.server.budgets import BudgetFileError, load_budgets
from costserve.server.cli import main as server_main
from costserve.server.errors import Unauthenticated
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

BUDGETS = """
[tenants.acme]
usd_per_hour = 100.0

[tenants.globex]
usd_per_hour = 100.0
"""
ISSUER = "https://login.example.com/"
AUDIENCE = "costserve"
SPEND = "costserve_tenant_spend_usd_total"
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
#: Every way a caller of globex tried to charge acme when the header chose who pays, and the
#: status each now gets.
SPOOFS: list[tuple[tuple[str, ...], grpc.StatusCode]] = [
    (("acme",), PERMISSION_DENIED),
    (("ACME",), PERMISSION_DENIED),
    (("acme ",), PERMISSION_DENIED),
    (("nobody-we-know",), PERMISSION_DENIED),
    (("zzz", "acme"), INVALID_ARGUMENT),
    (("globex", "acme"), INVALID_ARGUMENT),
    (("acme corp",), INVALID_ARGUMENT),
]
#: Metadata that charges the caller's own tenant: none, empty, and its own name spelled otherwise.
OWN_TENANT: list[tuple[str, ...]] = [(), ("",), ("globex",), ("GLOBEX ",)]


def _tenant(*names: str) -> list[tuple[str, str]]:
    return [("x-costserve-tenant", name) for name in names]


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _status(call: Callable[..., Any], *args: Any) -> grpc.StatusCode:
    """The status of ``call(*args)``."""
    try:
        call(*args)
    except grpc.RpcError as error:
        return error.code()
    return OK


def _message(call: Callable[[], Any]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.details() or ""


@dataclass
class Credentials:
    """API keys and JWT signing keys made for a test, and tokens of each kind by tenant."""

    keys_file: Path
    jwks_file: Path
    signing_key: ec.EllipticCurvePrivateKey
    api_keys: dict[str, str]

    def jwt(self, tenant: str, role: str = "", lifetime_s: float = 600, claims: dict[str, Any] | None = None) -> str:
        """A token for ``tenant`` signed by the current key; ``claims`` replace (None: remove) the usual ones."""
        now = time.time()
        payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"{tenant}-service", "tenant": tenant}
        payload.update(iat=int(now), exp=int(now + lifetime_s))
        payload.update(claims or {})
        payload = {name: value for name, value in payload.items() if value is not None}
        if role:
            payload["role"] = role
        return jwt.encode(payload, self.signing_key, algorithm="ES256", headers={"kid": "current"})

    def token(self, kind: str, tenant: str) -> str:
        """A valid credential of ``kind`` for ``tenant`` (``edge`` is the gateway)."""
        if kind == "api-key":
            return self.api_keys[tenant]
        return self.jwt(tenant, role="gateway" if tenant == "edge" else "")


def _jwks(*keys: tuple[str, ec.EllipticCurvePrivateKey]) -> str:
    algorithm = jwt.get_algorithm_by_name("ES256")
    entries = []
    for key_id, private_key in keys:
        entry = json.loads(algorithm.to_jwk(private_key.public_key()))
        entries.append({**entry, "kid": key_id, "alg": "ES256", "use": "sig"})
    return json.dumps({"keys": entries})


@pytest.fixture
def credentials(tmp_path: Path) -> Credentials:
    keys_file = tmp_path / "keys.toml"
    api_keys = {tenant: add_key(keys_file, tenant)[0] for tenant in ("acme", "globex")}
    api_keys["edge"] = add_key(keys_file, "edge", Role.GATEWAY, "the gateway")[0]
    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(_jwks(("current", signing_key)))
    return Credentials(keys_file, jwks_file, signing_key, api_keys)


@pytest.fixture
def bearer_server(
    start_budgeted_server: Callable[..., RunningServer], credentials: Credentials
) -> Iterator[RunningServer]:
    yield start_budgeted_server(
        BUDGETS,
        auth_keys=credentials.keys_file,
        jwt_keys=credentials.jwks_file,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )


@pytest.fixture
def channel(bearer_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(bearer_server.target) as opened:
        yield opened


def _predict(channel: grpc.Channel, metadata: Sequence[tuple[str, str]], precision: str = "fp32") -> pb.PredictResponse:
    image = np.asarray(Image.open(EXAMPLES[0]))
    request = predict_request([image], precision=precision, skip_cache=True)
    return pb_grpc.ClassifierStub(channel).Predict(request, timeout=30, metadata=list(metadata))


def _spend(server: RunningServer) -> dict[str, float]:
    return {tenant: server.metric(SPEND, {"tenant": tenant}) for tenant in ("acme", "globex", "other")}


# --- bearer credentials: API keys and JWTs -------------------------------------------------


@pytest.mark.parametrize("kind", ["api-key", "jwt"])
def test_calls_without_valid_credentials_are_unauthenticated_and_health_stays_open(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials, kind: str
) -> None:
    valid = credentials.token(kind, "globex")
    forged = (
        "csk_" + "A" * 43 if kind == "api-key" else credentials.jwt("globex", claims={"exp": int(time.time()) - 3600})
    )
    refused = [
        [],
        _tenant("globex"),
        _bearer(forged),
        _bearer(valid[:-2]),
        [("authorization", f"Basic {valid}")],
        [("authorization", valid)],
        _bearer(valid) + _bearer(valid),
        _tenant("zzz", "acme"),  # credentials are checked first: no hint about the tenant header
    ]
    for metadata in refused:
        assert _status(_predict, channel, metadata) == UNAUTHENTICATED, metadata
    assert _status(lambda: _predict(channel, _bearer(valid))) == OK
    assert bearer_server.metric("costserve_requests_total", {"code": "UNAUTHENTICATED"}) == len(refused)
    assert bearer_server.metric("costserve_rejected_total", {"reason": "unauthenticated"}) == len(refused)
    spent = _spend(bearer_server)
    assert spent["globex"] > 0 and spent["acme"] == spent["other"] == 0
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(v2.ServerLiveRequest(), timeout=10).live


@pytest.mark.parametrize("kind", ["api-key", "jwt"])
def test_spend_lands_on_the_callers_tenant_and_no_spoof_moves_another_tenants(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials, kind: str
) -> None:
    own = _bearer(credentials.token(kind, "globex"))
    spent_before = 0.0
    for names in OWN_TENANT:
        assert _status(_predict, channel, own + _tenant(*names)) == OK, names
        spent = _spend(bearer_server)
        assert spent["globex"] > spent_before, f"{names} was not charged to globex"
        spent_before = spent["globex"]
    for names, expected in SPOOFS:
        assert _status(_predict, channel, own + _tenant(*names)) == expected, names
    assert _spend(bearer_server) == {"acme": 0.0, "globex": spent_before, "other": 0.0}
    assert bearer_server.metric("costserve_requests_total", {"code": "PERMISSION_DENIED"}) == sum(
        expected == PERMISSION_DENIED for _, expected in SPOOFS
    )


@pytest.mark.parametrize("kind", ["api-key", "jwt"])
def test_a_gateway_charges_the_tenant_it_names_and_itself_otherwise(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials, kind: str
) -> None:
    gateway = _bearer(credentials.token(kind, "edge"))
    _predict(channel, gateway + _tenant("ACME"))
    assert _spend(bearer_server)["acme"] > 0
    _predict(channel, gateway)
    assert _spend(bearer_server)["other"] > 0  # edge has no budget: counted as other
    assert _spend(bearer_server)["globex"] == 0


def test_a_budget_refusal_speaks_only_of_the_callers_own_tenant(
    start_budgeted_server: Callable[..., RunningServer], credentials: Credentials
) -> None:
    server = start_budgeted_server(
        "[tenants.acme]\nusd_per_hour = 1e-12\n[tenants.globex]\nusd_per_hour = 1e-12\n",
        auth_keys=credentials.keys_file,
    )
    with grpc.insecure_channel(server.target) as channel:
        acme = _bearer(credentials.api_keys["acme"])
        globex = _bearer(credentials.api_keys["globex"])
        _predict(channel, acme)  # crosses acme's budget
        message = _message(lambda: _predict(channel, acme))
        assert "'acme'" in message and "globex" not in message
        # globex's caller cannot spend acme's budget, nor learn about it.
        denied = _message(lambda: _predict(channel, globex + _tenant("acme")))
        assert "spent" not in denied and "budget" not in denied
        assert _status(lambda: _predict(channel, globex)) == OK
    assert server.metric("costserve_budget_rejections_total", {"tenant": "globex"}) == 0


def test_a_revoked_key_is_refused_from_the_next_call_and_a_new_one_admitted_without_restart(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials
) -> None:
    acme, globex = _bearer(credentials.api_keys["acme"]), _bearer(credentials.api_keys["globex"])
    assert _status(lambda: _predict(channel, acme)) == OK
    acme_id = next(key.key_id for key in read_keys(credentials.keys_file) if key.tenant == "acme")
    revoke_key(credentials.keys_file, acme_id)
    assert _status(lambda: _predict(channel, acme)) == UNAUTHENTICATED
    assert _status(lambda: _predict(channel, globex)) == OK
    fresh, _ = add_key(credentials.keys_file, "acme", name="rotated")
    assert _status(lambda: _predict(channel, _bearer(fresh))) == OK
    # A file that cannot be read keeps the keys last read; a removed file admits no key.
    credentials.keys_file.write_text("not [toml")
    assert _status(lambda: _predict(channel, _bearer(fresh))) == OK
    credentials.keys_file.unlink()
    assert _status(lambda: _predict(channel, _bearer(fresh))) == UNAUTHENTICATED


def test_the_same_identity_reaches_every_protocol(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials
) -> None:
    image = np.asarray(Image.open(EXAMPLES[1]))[None]
    key = credentials.api_keys["globex"]
    triton_client = triton.InferenceServerClient(bearer_server.target)
    tensor = triton.InferInput("images", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    tf_request = predict_pb2.PredictRequest()
    tf_request.model_spec.name = "digits"
    tf_request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
    tf_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def v2_call(headers: dict[str, str]) -> Any:
        return triton_client.infer("digits", [tensor], headers=headers, parameters={"skip_cache": True})

    def tfs_call(metadata: list[tuple[str, str]]) -> Any:
        return tf_stub.Predict(tf_request, timeout=30, metadata=[*metadata, ("x-costserve-precision", "fp32")])

    calls: list[tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]] = [
        (
            lambda: _predict(channel, []),
            lambda: _predict(channel, _bearer(key) + _tenant("acme")),
            lambda: _predict(channel, _bearer(key)),
        ),
        (
            lambda: tfs_call([]),
            lambda: tfs_call(_bearer(key) + _tenant("acme")),
            lambda: tfs_call(_bearer(key)),
        ),
    ]
    for anonymous, spoofed, honest in calls:
        before = _spend(bearer_server)["globex"]
        assert _status(anonymous) == UNAUTHENTICATED
        assert _status(spoofed) == PERMISSION_DENIED
        honest()
        assert _spend(bearer_server)["globex"] > before
    before = _spend(bearer_server)["globex"]
    with pytest.raises(Exception, match="StatusCode.UNAUTHENTICATED"):
        v2_call({})
    with pytest.raises(Exception, match="StatusCode.PERMISSION_DENIED"):
        v2_call({"authorization": f"Bearer {key}", "x-costserve-tenant": "acme"})
    v2_call({"authorization": f"Bearer {key}"})
    assert _spend(bearer_server)["globex"] > before
    assert _spend(bearer_server)["acme"] == 0
    triton_client.close()


def test_a_stream_is_charged_to_its_callers_tenant(
    bearer_server: RunningServer, channel: grpc.Channel, credentials: Credentials
) -> None:
    image = np.asarray(Image.open(EXAMPLES[2]))
    requests = [predict_request([image], precision="fp32", skip_cache=True) for _ in range(3)]
    stub = pb_grpc.ClassifierStub(channel)

    def stream(metadata: list[tuple[str, str]]) -> list[pb.PredictResponse]:
        return list(stub.PredictStream(iter(requests), timeout=30, metadata=metadata))

    assert _status(stream, []) == UNAUTHENTICATED
    assert _status(stream, _bearer(credentials.api_keys["globex"]) + _tenant("acme")) == PERMISSION_DENIED
    answers = stream(_bearer(credentials.api_keys["globex"]))
    assert len(answers) == 3
    spent = _spend(bearer_server)
    assert spent["globex"] == pytest.approx(sum(answer.cost.usd for answer in answers))
    assert spent["acme"] == spent["other"] == 0


# --- client certificates --------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.mark.parametrize(
    ("source", "pattern"), [("common-name", ""), ("uri-san", "spiffe://example.org/tenant/([^/]+)")]
)
def test_client_certificates_name_the_tenant(
    start_budgeted_server: Callable[..., RunningServer], pki: Pki, source: str, pattern: str
) -> None:
    server = start_budgeted_server(
        BUDGETS,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
        tls_client_tenant=source,
        tls_client_tenant_pattern=pattern,
        tls_client_gateways="edge",
    )

    def issued(tenant: str, common_name: str | None = None) -> TlsFiles:
        names = [x509.UniformResourceIdentifier(f"spiffe://example.org/tenant/{tenant}")]
        certificate = pki.authority.issue(common_name or tenant, names=names)
        return TlsFiles(ca=pki.ca.cert, cert=certificate.cert, key=certificate.key)

    def predict(tls: TlsFiles, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
        with secure_or_plain_channel(server.target, tls=tls) as channel:
            return _status(_predict, channel, metadata)

    globex, edge = issued("globex"), issued("edge")
    for names in OWN_TENANT:
        assert predict(globex, _tenant(*names)) == OK
    for names, expected in SPOOFS:
        assert predict(globex, _tenant(*names)) == expected, names
    assert _spend(server)["acme"] == 0 and _spend(server)["globex"] > 0
    assert predict(edge, _tenant("acme")) == OK
    assert _spend(server)["acme"] > 0
    # A certificate whose name is no tenant name (or does not fit the pattern) identifies nobody.
    nameless = issued("Not A Tenant!", common_name="Not A Tenant!")
    assert predict(nameless, []) == UNAUTHENTICATED
    # A bearer token, when the call carries one, is the identity: none is configured here.
    assert predict(globex, _bearer("csk_whatever")) == UNAUTHENTICATED


# --- who may read model information and reflection ------------------------------------------


def _reflection_services(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata)
    return [service.name for answer in answers for service in answer.list_services_response.service]


@pytest.mark.parametrize("model_info", ["on", "authenticated", "off"])
def test_model_information_and_reflection_follow_their_settings(
    start_server: Callable[..., RunningServer], credentials: Credentials, model_info: str
) -> None:
    reflection = {"on": "off", "authenticated": "authenticated", "off": "on"}[model_info]
    server = start_server(auth_keys=credentials.keys_file, model_info=model_info, reflection=reflection)
    key = _bearer(credentials.api_keys["acme"])
    expected_with_key = PERMISSION_DENIED if model_info == "off" else OK
    expected_without = {"on": OK, "authenticated": UNAUTHENTICATED, "off": PERMISSION_DENIED}[model_info]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
        tf_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        model_calls: list[Callable[[list[tuple[str, str]]], Any]] = [
            lambda metadata: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata),
            lambda metadata: stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata),
            lambda metadata: v2_stub.ModelMetadata(
                v2.ModelMetadataRequest(name="digits"), timeout=10, metadata=metadata
            ),
            lambda metadata: v2_stub.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10, metadata=metadata),
            lambda metadata: tf_stub.GetModelMetadata(
                get_model_metadata_pb2.GetModelMetadataRequest(
                    model_spec={"name": "digits"}, metadata_field=["signature_def"]
                ),
                timeout=10,
                metadata=metadata,
            ),
        ]
        for call in model_calls:
            assert _status(call, []) == expected_without
            assert _status(call, key) == expected_with_key
        if reflection == "off":
            assert _status(lambda: _reflection_services(channel, key)) == grpc.StatusCode.UNIMPLEMENTED
        elif reflection == "authenticated":
            assert _status(lambda: _reflection_services(channel, [])) == UNAUTHENTICATED
            assert "costserve.v1.Classifier" in _reflection_services(channel, key)
        else:
            assert "costserve.v1.Classifier" in _reflection_services(channel, [])


# --- authentication off: the header names the tenant, normalised -----------------------------


def test_without_authentication_the_header_names_the_tenant_in_one_normal_form(
    start_budgeted_server: Callable[..., RunningServer],
) -> None:
    server = start_budgeted_server(BUDGETS)
    with grpc.insecure_channel(server.target) as channel:
        _predict(channel, _tenant(" ACME "))
        assert _spend(server)["acme"] > 0
        assert _status(lambda: _predict(channel, _tenant("zzz", "acme"))) == INVALID_ARGUMENT
        assert "tenant name" in _message(lambda: _predict(channel, _tenant("acme corp")))
        # Model information and reflection are open: with no authentication, "authenticated" is everyone.
        assert pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
        assert "costserve.v1.Classifier" in _reflection_services(channel, [])


# --- the parts, without a server ---------------------------------------------------------------


def test_tenant_names_are_normalised_one_way() -> None:
    assert normalize_tenant(" Acme ") == "acme"
    assert normalize_tenant("\uff21\uff23\uff2d\uff25") == "acme"  # fullwidth
    assert normalize_tenant("ops@acme.example") == "ops@acme.example"
    assert normalize_tenant("   ") == ""
    for bad in ("acme corp", "-acme", "a" * 65, "acme/x", "ac\nme"):
        with pytest.raises(ValueError, match="not a tenant name"):
            normalize_tenant(bad)


def test_the_budgets_file_names_tenants_in_the_normal_form(tmp_path: Path) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text("[tenants.ACME]\nusd_per_hour = 1\n")
    assert list(load_budgets(path).tenants) == ["acme"]
    path.write_text("[tenants.acme]\nusd_per_hour = 1\n[tenants.ACME]\nusd_per_day = 1\n")
    with pytest.raises(BudgetFileError, match="named twice"):
        load_budgets(path)
    path.write_text('[tenants."acme corp"]\nusd_per_hour = 1\n')
    with pytest.raises(BudgetFileError, match="not a tenant name"):
        load_budgets(path)


def test_the_keys_file_holds_hashes_only_and_the_keys_command_manages_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    assert (
        server_main(["keys", "add", "--tenant", "Acme", "--role", "gateway", "--name", "ci", "--file", str(path)]) == 0
    )
    key = capsys.readouterr().out.strip()
    assert key.startswith("csk_") and len(key) > 40
    assert key not in path.read_text()
    (entry,) = read_keys(path)
    assert (entry.tenant, entry.role, entry.name) == ("acme", Role.GATEWAY, "ci")
    assert server_main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert entry.key_id in listing and key not in listing
    assert server_main(["keys", "revoke", entry.key_id, "--file", str(path)]) == 0
    assert read_keys(path) == []
    assert server_main(["keys", "revoke", entry.key_id, "--file", str(path)]) == 1
    path.write_text('[keys.x]\nsha256 = "abc"\ntenant = "acme"\n')
    with pytest.raises(ValueError, match="64 lower-case hex"):
        read_keys(path)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_jwt_tokens_are_checked_for_signature_issuer_audience_and_expiry(
    credentials: Credentials, tmp_path: Path
) -> None:
    clock = Clock()
    verifier = JwtVerifier(credentials.jwks_file, ISSUER, AUDIENCE, leeway_s=5, clock=clock)
    assert verifier.identify(credentials.jwt("Globex")) == Identity("globex", Role.USER, "token of 'Globex-service'")
    assert verifier.identify(credentials.jwt("edge", role="gateway")).role is Role.GATEWAY
    stranger = ec.generate_private_key(ec.SECP256R1())
    public_pem = credentials.signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "exp": now + 600}
    refused = {
        "expired": credentials.jwt("acme", lifetime_s=-60),
        "issuer": credentials.jwt("acme", claims={"iss": "https://elsewhere.example/"}),
        "audience": credentials.jwt("acme", claims={"aud": "someone-else"}),
        "no tenant": credentials.jwt("acme", claims={"tenant": None}),
        "bad tenant": credentials.jwt("acme corp"),
        "other key": jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "current"}),
        "unknown kid": jwt.encode(claims, credentials.signing_key, algorithm="ES256", headers={"kid": "old"}),
        "no exp": jwt.encode(
            {k: v for k, v in claims.items() if k != "exp"}, credentials.signing_key, "ES256", {"kid": "current"}
        ),
        "alg none": jwt.encode(claims, None, algorithm="none", headers={"kid": "current"}),
        "hmac with the public key": _hs256(claims, public_pem),
        "not a token": "not.a.token",
    }
    for case, token in refused.items():
        with pytest.raises(Unauthenticated):
            verifier.identify(token)
            pytest.fail(f"{case} was accepted")
    # A remembered token still expires, and a new key file forgets every remembered token.
    short = credentials.jwt("acme", lifetime_s=60)
    assert verifier.identify(short).tenant == "acme"
    clock.now += 120
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.identify(short)
    clock.now = time.time()
    kept = credentials.jwt("acme")
    verifier.identify(kept)
    rotated = ec.generate_private_key(ec.SECP256R1())
    credentials.jwks_file.write_text(_jwks(("next", rotated)))
    with pytest.raises(Unauthenticated, match="not one of --jwt-keys"):
        verifier.identify(kept)
    token = jwt.encode({**claims, "exp": int(time.time()) + 600}, rotated, algorithm="ES256", headers={"kid": "next"})
    assert verifier.identify(token).tenant == "acme"
    # A PEM public key works as well as a JWKS; a private or symmetric key file is refused.
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem)
    assert JwtVerifier(pem, ISSUER, AUDIENCE).identify(credentials.jwt("acme")).tenant == "acme"
    (tmp_path / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}))
    with pytest.raises(ValueError, match="symmetric"):
        JwtVerifier(tmp_path / "oct.json", ISSUER, AUDIENCE)


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """A token signed with HMAC using the public key as the secret: the classic algorithm-confusion forgery."""
    import base64
    import hashlib
    import hmac

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signed = (
        part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "current"}).encode())
        + "."
        + part(json.dumps(claims).encode())
    )
    return signed + "." + part(hmac.new(secret, signed.encode(), hashlib.sha256).digest())
