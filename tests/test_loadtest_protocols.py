"""`costserve loadtest --protocol v1|v2|tfserving`: the requests each protocol writes, the answers it reads,
and the real load test through each protocol against a real server on port 0.

The requests are checked by parsing them with the protocols' generated classes (each is written as
concatenated bytes, not through them); the answers by reading messages built here. The runs
against a server are small and bounded; nothing asserts a speed.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, RunningServer

from costserve.cli import main
from costserve.loadtest import LoadReport, LoadtestConfig, RepeatSpec, run_loadtest
from costserve.loadtest.inputs import FileInputPool, InputPicker, InputPool, find_images, load_holdout_digits
from costserve.loadtest.protocols import (
    CODECS,
    ModelFacts,
    Reply,
    TFServingCodec,
    V1Codec,
    V2Codec,
    infer_outputs,
    model_spec,
)
from costserve.loadtest.report import format_table
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import tensorflow_pb2 as tf
from costserve.protocols import tensorflow_serving_pb2 as tfs
from costserve.v1 import classifier_pb2 as pb

DIGITS = ModelFacts(
    input_shape=(28, 28, 1), labels=tuple(str(digit) for digit in range(10)), signature_input="image",
    signature_output="output_0",
)  # fmt: skip


@pytest.fixture(scope="module")
def digits_pool() -> InputPool:
    return InputPool(*load_holdout_digits())


def digit_folder(root: Path) -> Path:
    """The example digits as an ImageFolder: one sub-folder per digit, named as the model's labels."""
    for path in EXAMPLES:
        digit = path.stem.split("_")[1]
        (root / digit).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / digit / path.name)
    return root


# --------------------------------------------------------------------------- requests


def test_v2_request_is_one_raw_uint8_tensor_with_the_parameters(digits_pool: InputPool) -> None:
    config = LoadtestConfig(
        protocol="v2", images_per_request=3, precision="fp32", skip_cache=True, model="digits", model_version="1"
    )
    picker = InputPicker(digits_pool, config, 0, 1, V2Codec(config, digits_pool, DIGITS))
    payload, ids, new = picker.request()
    request = v2.ModelInferRequest.FromString(payload)
    assert (request.model_name, request.model_version) == ("digits", "1") and ids == new == [0, 1, 2]
    assert request.parameters["precision"].string_param == "fp32" and request.parameters["skip_cache"].bool_param
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("images", "UINT8", [3, 28, 28, 1])
    assert not tensor.HasField("contents")
    assert list(request.raw_input_contents) == [b"".join(digits_pool.image(input_id).tobytes() for input_id in ids)]

    default = LoadtestConfig(protocol="v2")
    request = v2.ModelInferRequest.FromString(V2Codec(default, digits_pool, DIGITS).request([7]))
    assert dict(request.parameters) == {"precision": v2.InferParameter(string_param="auto")}
    assert request.model_name == "" and list(request.inputs[0].shape) == [1, 28, 28, 1]


def test_v2_repeats_grey_levels_into_the_models_channels(digits_pool: InputPool) -> None:
    rgb = ModelFacts(input_shape=(28, 28, 3))
    request = v2.ModelInferRequest.FromString(V2Codec(LoadtestConfig(protocol="v2"), digits_pool, rgb).request([4]))
    assert list(request.inputs[0].shape) == [1, 28, 28, 3]
    pixels = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(28, 28, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], digits_pool.image(4))


def test_files_go_as_bytes_tensors(tmp_path: Path) -> None:
    pool = FileInputPool(find_images(digit_folder(tmp_path)))
    files = [pool.image(0), pool.image(1)]
    config = LoadtestConfig(protocol="v2", images_per_request=2)
    request = v2.ModelInferRequest.FromString(V2Codec(config, pool, DIGITS).request([0, 1]))
    assert (request.inputs[0].datatype, list(request.inputs[0].shape)) == ("BYTES", [2])
    assert request.raw_input_contents[0] == b"".join(struct.pack("<I", len(data)) + data for data in files)

    config = LoadtestConfig(protocol="tfserving", images_per_request=2)
    request = tfs.PredictRequest.FromString(TFServingCodec(config, pool, DIGITS).request([0, 1]))
    tensor = request.inputs["image"]
    assert tensor.dtype == tf.DT_STRING and [dim.size for dim in tensor.tensor_shape.dim] == [2]
    assert list(tensor.string_val) == files


def test_tfserving_request_is_the_message_protobuf_would_write(digits_pool: InputPool) -> None:
    config = LoadtestConfig(protocol="tfserving", images_per_request=2, model="digits", model_version="1")
    payload = TFServingCodec(config, digits_pool, DIGITS).request([0, 5])
    shape = tf.TensorShapeProto(dim=[tf.TensorShapeProto.Dim(size=size) for size in (2, 28, 28, 1)])
    tensor = tf.TensorProto(
        dtype=tf.DT_UINT8,
        tensor_shape=shape,
        tensor_content=digits_pool.image(0).tobytes() + digits_pool.image(5).tobytes(),
    )
    expected = tfs.PredictRequest(model_spec=model_spec("digits", "1"), inputs={"image": tensor})
    assert payload == expected.SerializeToString()
    request = tfs.PredictRequest.FromString(payload)
    assert request.model_spec.version.value == 1 and request.model_spec.signature_name == "serving_default"
    assert model_spec("digits", "canary").version_label == "canary"
    assert model_spec("", "").WhichOneof("version_choice") is None


def test_v1_request_is_unchanged(digits_pool: InputPool) -> None:
    config = LoadtestConfig(images_per_request=2, precision="int8", model="digits")
    payload, ids, _ = InputPicker(digits_pool, config, 0, 1).request()
    request = pb.PredictRequest.FromString(payload)
    assert request.precision == pb.PRECISION_INT8 and request.model_name == "digits" and len(request.images) == 2
    assert payload == b"".join(digits_pool.field(input_id) for input_id in ids) + V1Codec(config, digits_pool).tail


# --------------------------------------------------------------------------- answers


def _v2_response(raw: bool) -> Any:
    response = v2.ModelInferResponse(model_name="digits", model_version="1")
    response.parameters["cost_usd"].double_param = 2e-6
    response.parameters["precision"].string_param = "int8"
    response.parameters["cache_hits"].int64_param = 1
    probabilities = np.array([[0.1, 0.9], [0.8, 0.2]], dtype="<f4")
    classes = np.array([1, 0], dtype="<i8")
    labels = [b"seven", b"one"]
    outputs = [("probabilities", "FP32", [2, 2]), ("labels", "BYTES", [2]), ("classes", "INT64", [2])]
    for name, datatype, shape in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
    if raw:
        response.raw_output_contents.extend(
            [
                probabilities.tobytes(),
                b"".join(struct.pack("<I", len(label)) + label for label in labels),
                classes.tobytes(),
            ]
        )
    else:
        response.outputs[0].contents.fp32_contents.extend(probabilities.ravel().tolist())
        response.outputs[1].contents.bytes_contents.extend(labels)
        response.outputs[2].contents.int64_contents.extend(classes.tolist())
    return response


@pytest.mark.parametrize("raw", [True, False], ids=["raw outputs", "typed contents"])
def test_v2_reply_reads_outputs_and_parameters(raw: bool, digits_pool: InputPool) -> None:
    response = _v2_response(raw)
    outputs = infer_outputs(response)
    np.testing.assert_array_equal(outputs["probabilities"], np.array([[0.1, 0.9], [0.8, 0.2]], dtype="<f4"))
    assert outputs["labels"] == [b"seven", b"one"] and outputs["classes"].tolist() == [1, 0]  # type: ignore[union-attr]

    reply = V2Codec(LoadtestConfig(protocol="v2"), digits_pool, DIGITS).reply(response, None)
    assert [(answer.label, answer.label_name) for answer in reply.answers] == [(1, "seven"), (0, "one")]
    assert reply.cost_usd == 2e-6 and list(reply.precisions) == ["int8", "int8"] and reply.cache_hits == 1


def test_tfserving_reply_is_the_top_class_and_the_trailers_cost(digits_pool: InputPool) -> None:
    probabilities = np.eye(10, dtype="<f4")[[3, 8]]
    shape = tf.TensorShapeProto(dim=[tf.TensorShapeProto.Dim(size=2), tf.TensorShapeProto.Dim(size=10)])
    output = tf.TensorProto(dtype=tf.DT_FLOAT, tensor_shape=shape, tensor_content=probabilities.tobytes())
    response = tfs.PredictResponse(outputs={"output_0": output})
    codec = TFServingCodec(LoadtestConfig(protocol="tfserving"), digits_pool, DIGITS)
    reply = codec.reply(response, (("x-costserve-cost-usd", "3.5e-06"),))
    assert [(answer.label, answer.label_name) for answer in reply.answers] == [(3, "3"), (8, "8")]
    assert reply.cost_usd == 3.5e-6 and reply.cache_hits is None and not reply.precisions
    typed = tfs.PredictResponse(
        outputs={"output_0": tf.TensorProto(dtype=tf.DT_FLOAT, tensor_shape=shape, float_val=probabilities.ravel())}
    )
    assert [answer.label for answer in codec.reply(typed, ()).answers] == [3, 8]


def test_warm_hits_from_flags_or_from_a_count() -> None:
    # Inputs 1 and 2 new, 0 a repeat: from a count, only hits beyond the one repeat are on new inputs.
    assert Reply(answers=(), cost_usd=0, cache_hits=2).warm_hits([0, 1, 2], [1, 2]) == 1
    assert Reply(answers=(), cost_usd=0, cache_hits=1).warm_hits([0, 1, 2], [1, 2]) == 0
    assert Reply(answers=(), cost_usd=0, cache_hits=1, hit_flags=[False, True, False]).warm_hits([0, 1, 2], [1, 2]) == 1
    assert Reply(answers=(), cost_usd=0).warm_hits([0], [0]) == 0


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--protocol", "v2", "--stream"], "--stream pipelines requests on costserve.v1's PredictStream"),
        (["--protocol", "tfserving", "--stream"], "--protocol tfserving has no stream"),
        (["--protocol", "tfserving", "--skip-cache"], "--skip-cache: TF Serving's Predict has no way"),
    ],
)
def test_what_a_protocol_cannot_do_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["loadtest", "--target", "127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_protocols_are_the_metric_label_values() -> None:
    assert list(CODECS) == ["v1", "v2", "tfserving"]
    with pytest.raises(ValueError, match="--protocol is one of v1, v2, tfserving"):
        LoadtestConfig(protocol="v3").validate()


# --------------------------------------------------------------------------- against a server


def run(server: RunningServer, **settings: Any) -> LoadReport:
    return run_loadtest(LoadtestConfig(target=server.target, **{"warmup_s": 0.0, **settings}))


def only_step(report: LoadReport) -> dict[str, Any]:
    assert len(report.steps) == 1
    return report.steps[0].summary()


def requests_counted(server: RunningServer, protocol: str, **labels: str) -> float:
    return server.metric("costserve_requests_total", {"protocol": protocol, **labels})


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["v1", "v2", "tfserving"])
def test_each_protocol_is_answered_priced_and_counted(protocol: str, server: RunningServer) -> None:
    method = {"v1": "Predict", "v2": "ModelInfer", "tfserving": "Predict"}[protocol]
    before = requests_counted(server, protocol, method=method)
    report = run(server, protocol=protocol, concurrency=(4,), requests=120, images_per_request=2)
    row = only_step(report)
    assert row["requests"] == row["ok"] == 120 and row["errors"] == {} and row["predictions"] == 240
    assert requests_counted(server, protocol, method=method, code="OK") - before == 120
    assert row["accuracy"] > 0.9
    assert row["cost_usd_per_prediction"] > 0
    charged = server.metric("costserve_cost_usd_total")  # this server answered nothing else
    assert row["cost_usd_per_prediction"] == pytest.approx(charged / 240, rel=1e-6)
    table = format_table(report)
    assert set(row["precision_mix"]) <= {"fp32", "int8"} and row["precision_mix"]
    if protocol == "tfserving":
        assert row["cache_hit_ratio"] is None
        assert "TF Serving Predict" in table and any("hit % is not known" in note for note in report.notes)
    else:
        assert row["cache_hit_ratio"] == 0.0
        assert not report.notes


@pytest.mark.slow
def test_v2_reports_cache_hits_and_the_precision_asked(server: RunningServer) -> None:
    row = only_step(run(server, protocol="v2", concurrency=(2,), requests=200, repeat=RepeatSpec(fraction=0.5)))
    assert row["cache_hit_ratio"] == pytest.approx(0.5, abs=0.05)
    assert server.metric("costserve_cache_hits_total") == round(row["cache_hit_ratio"] * 200)
    assert not any("--seed" in note for note in row["notes"])  # a hit count per request still tells warm hits
    again = only_step(run(server, protocol="v2", concurrency=(2,), requests=20))
    assert again["cache_hit_ratio"] == 1.0 and any("--seed" in note for note in again["notes"])

    computed = only_step(run(server, protocol="v2", requests=20, precision="int8", skip_cache=True, seed=3))
    assert computed["precision_mix"] == {"int8": 1.0} and computed["cache_hit_ratio"] == 0.0


@pytest.mark.slow
def test_tfserving_asks_for_the_precision_in_metadata(server: RunningServer) -> None:
    row = only_step(run(server, protocol="tfserving", requests=20, precision="int8", seed=4))
    assert row["precision_mix"] == {"int8": 1.0}
    assert requests_counted(server, "tfserving", precision="int8", code="OK") == 20


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["v2", "tfserving"])
def test_open_loop_and_processes_through_a_protocol(protocol: str, server: RunningServer) -> None:
    row = only_step(run(server, protocol=protocol, rate=(100.0,), arrivals="constant", requests=40, processes=2))
    assert row["requests"] == row["ok"] == 40 and row["client"]["processes"] == 2
    assert requests_counted(server, protocol, code="OK") >= 40


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["v2", "tfserving"])
def test_image_files_through_a_protocol(protocol: str, server: RunningServer, tmp_path: Path) -> None:
    folder = digit_folder(tmp_path / "digits")
    row = only_step(run(server, protocol=protocol, inputs=str(folder), requests=len(EXAMPLES)))
    assert row["ok"] == len(EXAMPLES) and row["accuracy"] is not None and row["accuracy"] >= 0.5


@pytest.mark.slow
def test_cli_through_v2(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["loadtest", "--target", server.target, "--protocol", "v2", "--requests", "10", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "v2 ModelInfer" in out and "concurrency 1" in out
