"""The client side of the model repository: model/version/top_k in requests, ListModels, NOT_FOUND,
``costserve models``/``info``/``predict`` flags, ``loadtest --inputs DIR`` and ``cost --by-model``.

A small real gRPC server (``costserve.v1.Classifier`` on grpc.aio, port 0) stands in for the
server: it records every request, serves two models, and answers an unknown one with NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from conftest import Route
from PIL import Image

from costserve import AsyncClient, Client, predict_request, version_state_name
from costserve.cli import build_parser, main
from costserve.cost_report import compute_report, format_models, model_figures, parse_metrics_text, prometheus_queries
from costserve.loadtest import LoadtestConfig, run_loadtest
from costserve.loadtest.cli import config_from_args
from costserve.loadtest.config import LoadStep
from costserve.loadtest.inputs import FileInputPool, InputPicker, find_images
from costserve.loadtest.report import LoadReport, StepResult, format_table
from costserve.loadtest.samples import Samples
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

AVAILABLE, LOADING, FAILED = (
    pb.VersionStatus.STATE_AVAILABLE,
    pb.VersionStatus.STATE_LOADING,
    pb.VersionStatus.STATE_FAILED,
)
#: model -> its versions, oldest first: (version, state, reason). "digits" is the default model.
CATALOG: dict[str, list[tuple[str, pb.VersionStatus.State, str]]] = {
    "digits": [("1", AVAILABLE, ""), ("2", LOADING, "")],
    "colors": [("3", AVAILABLE, ""), ("4", FAILED, "saved_model.pb: no such file")],
}
LABELS = {"digits": [str(digit) for digit in range(10)], "colors": ["red", "green", "blue"]}
VERDICT = "on this host int8 costs 1.9x fp32 per image at batch 16"
COLORS = {"red": (230, 20, 10), "green": (10, 220, 30), "blue": (20, 10, 240)}


# --------------------------------------------------------------------------- the stand-in server


class FakeClassifier(pb_grpc.ClassifierServicer):
    """Serves CATALOG: "colors" answers each image's dominant channel; "digits" always answers 0."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def _resolve(self, name: str, version: str, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        name = name or "digits"
        if name not in CATALOG:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name!r}; models: {', '.join(sorted(CATALOG))}")
        served = [number for number, state, _ in CATALOG[name] if state == AVAILABLE]
        version = version or served[-1]
        if version not in served:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {name!r} serves no version {version!r}; served: {', '.join(served)}"
            )
        return name, version

    async def _answer(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        self.requests.append(request)
        name, version = await self._resolve(request.model_name, request.model_version, context)
        predictions = []
        for image in request.images:
            if name == "colors":
                with Image.open(io.BytesIO(image.encoded)) as decoded:
                    means = np.asarray(decoded.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
                probabilities = means / means.sum()
            else:
                probabilities = np.eye(10)[0]
            label = int(np.argmax(probabilities))
            classes = list(range(len(probabilities)))
            if request.top_k:
                classes = [int(index) for index in np.argsort(-probabilities, kind="stable")[: request.top_k]]
            predictions.append(
                pb.Prediction(
                    label=label,
                    label_name=LABELS[name][label],
                    score=float(probabilities[label]),
                    probabilities=[float(probabilities[index]) for index in classes],
                    classes=classes if request.top_k else [],
                    precision=pb.PRECISION_FP32,
                )
            )
        return pb.PredictResponse(
            predictions=predictions,
            model_name=name,
            model_version=version,
            cost=pb.Cost(usd=1e-6 * len(predictions)),
        )

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return await self._answer(request, context)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        async for request in request_iterator:
            yield await self._answer(request, context)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        self.requests.append(request)
        name, version = await self._resolve(request.model_name, request.model_version, context)
        info = pb.ModelInfo(name=name, version=version, labels=LABELS[name], max_images_per_request=8)
        if name == "digits":
            info.input_shape[:] = [28, 28, 1]
            info.variants.add(precision=pb.PRECISION_FP32, accuracy=0.9861, format="saved_model", size_bytes=1000)
            info.variants.add(precision=pb.PRECISION_INT8, accuracy=0.9833, format="tflite", size_bytes=300)
            info.holdout_examples = 360
            info.int8_agreement = 0.995
            info.preprocessing.CopyFrom(
                pb.Preprocessing(color_mode="grayscale", resize="stretch", scaling="unit", output="probabilities")
            )
        else:  # imported without held-out data: accuracies and agreement unset
            info.input_shape[:] = [32, 32, 3]
            info.variants.add(precision=pb.PRECISION_FP32, format="saved_model", size_bytes=5000, latency_ms_batch_1=2)
            info.preprocessing.CopyFrom(
                pb.Preprocessing(
                    color_mode="rgb",
                    resize="crop",
                    scaling="mean_std",
                    mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225],
                    output="logits",
                )
            )
        return info

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.requests.append(request)
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(
                    name=name,
                    is_default=name == "digits",
                    versions=[
                        pb.VersionStatus(
                            version=v,
                            state=state,
                            reason=reason,
                            cost_verdict=VERDICT if (name, state) == ("digits", AVAILABLE) else "",
                        )
                        for v, state, reason in versions
                    ],
                )
                for name, versions in CATALOG.items()
            ]
        )

    def sent(self, kind: type) -> list[Any]:
        """The requests of one message type received so far."""
        return [request for request in self.requests if isinstance(request, kind)]


@dataclass
class FakeServer:
    target: str
    servicer: FakeClassifier = field(repr=False)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """The stand-in server on 127.0.0.1, port 0, in its own thread and event loop; stopped afterwards."""
    servicer = FakeClassifier()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-classifier", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def png(path: Path, color: str, tag: int = 0) -> Path:
    """Write a 32x32 image of ``color`` (one pixel tagged, so every file differs) as PNG or JPEG by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32), COLORS[color])
    image.putpixel((0, 0), (tag % 256, tag // 256, 0))
    image.save(path)
    return path


# --------------------------------------------------------------------------- the client library


def test_requests_carry_model_version_and_top_k(fake: FakeServer, tmp_path: Path) -> None:
    red = png(tmp_path / "red.png", "red")
    with Client(fake.target, timeout=10) as client:
        reply = client.predict([red], model="colors", version="3", top_k=2)
        assert (reply.model_name, reply.model_version) == ("colors", "3")
        prediction = reply.predictions[0]
        assert prediction.label_name == "red" and list(prediction.classes)[0] == 0 and len(prediction.classes) == 2
        assert list(prediction.probabilities) == sorted(prediction.probabilities, reverse=True)
        _, call = client.predict_with_call([red], model="colors")
        assert call.code() == grpc.StatusCode.OK
        answers = list(client.predict_stream([[red], [red, red]], model="colors", version="3", top_k=1))
        assert [len(answer.predictions) for answer in answers] == [1, 2]
        default = client.predict([red])  # no model named: the server's default
        assert default.model_name == "digits" and len(default.predictions[0].probabilities) == 10
    sent = [(r.model_name, r.model_version, r.top_k) for r in fake.servicer.sent(pb.PredictRequest)]
    assert sent == [("colors", "3", 2), ("colors", "", 0), ("colors", "3", 1), ("colors", "3", 1), ("", "", 0)]


def test_model_info_and_list_models(fake: FakeServer) -> None:
    with Client(fake.target, timeout=10) as client:
        info = client.model_info("colors", "3")
        assert info.name == "colors" and not info.variants[0].HasField("accuracy")
        assert not info.HasField("int8_agreement") and info.preprocessing.scaling == "mean_std"
        assert client.model_info().name == "digits"
        models = client.list_models().models
    assert [(r.model_name, r.model_version) for r in fake.servicer.sent(pb.GetModelInfoRequest)] == [
        ("colors", "3"),
        ("", ""),
    ]
    assert [(model.name, model.is_default) for model in models] == [("digits", True), ("colors", False)]
    states = [(v.version, version_state_name(v.state), v.reason) for v in models[1].versions]
    assert states == [("3", "AVAILABLE", ""), ("4", "FAILED", "saved_model.pb: no such file")]


def test_async_client_sends_the_same_fields(fake: FakeServer, tmp_path: Path) -> None:
    blue = png(tmp_path / "blue.png", "blue")

    async def use() -> tuple[pb.PredictResponse, pb.ModelInfo, pb.ListModelsResponse, list[pb.PredictResponse]]:
        async with AsyncClient(fake.target, timeout=10) as client:
            reply = await client.predict([blue], model="colors", version="3", top_k=3)
            info = await client.model_info("colors")
            models = await client.list_models()
            stream = client.predict_stream([[blue]], model="colors", top_k=1)
            answers = [answer async for answer in stream]
            return reply, info, models, answers

    reply, info, models, answers = asyncio.run(use())
    assert reply.predictions[0].label_name == "blue" and list(reply.predictions[0].classes)[0] == 2
    assert info.name == "colors" and len(models.models) == 2 and len(answers[0].predictions[0].classes) == 1
    sent = [(r.model_name, r.model_version, r.top_k) for r in fake.servicer.sent(pb.PredictRequest)]
    assert sent == [("colors", "3", 3), ("colors", "", 1)]


def test_unknown_model_or_version_is_not_found(fake: FakeServer, tmp_path: Path) -> None:
    red = png(tmp_path / "red.png", "red")
    with Client(fake.target, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.predict([red], model="cats")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "colors, digits" in str(raised.value.details())
        with pytest.raises(grpc.RpcError) as raised:
            client.model_info("digits", "2")  # still loading: not served
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_predict_request_fields_and_a_negative_top_k() -> None:
    request = predict_request([b"\x89PNG"], model="colors", version="3", top_k=5)
    assert (request.model_name, request.model_version, request.top_k) == ("colors", "3", 5)
    with pytest.raises(ValueError, match="top_k"):
        predict_request([b"\x89PNG"], top_k=-1)
    assert version_state_name(pb.VersionStatus.STATE_UNLOADING) == "UNLOADING" and version_state_name(99) == "99"


# --------------------------------------------------------------------------- the CLI


def test_cli_parses_model_version_and_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["predict", "a.png", "--model", "colors", "--version", "3", "--top-k", "2"])
    assert (args.model, args.model_version, args.top_k) == ("colors", "3", 2)
    args = build_parser().parse_args(["info", "--model", "colors", "--version", "3"])
    assert (args.model, args.model_version) == ("colors", "3")
    monkeypatch.setenv("COSTSERVE_MODEL", "colors")
    for argv in (["predict", "a.png"], ["info"], ["loadtest"]):
        args = build_parser().parse_args(argv)
        assert (args.model, args.model_version) == ("colors", "")
    assert build_parser().parse_args(["info", "--model", "digits"]).model == "digits"  # the flag wins
    args = build_parser().parse_args(["loadtest", "--model", "m", "--version", "7", "--inputs", "photos"])
    config = config_from_args(args)
    assert (config.model, config.model_version, config.inputs) == ("m", "7", "photos")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "a.png", "--top-k", "-1"], "not 0 (every class) or more"),
        (["predict", "a.png", "--top-k", "two"], "not a whole number"),
        (["cost", "--by-model", "--by-tenant"], "not allowed with argument"),
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_models_lists_versions_and_states(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", fake.target, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "default", "version", "state", "note"]
    assert [" ".join(line.split()) for line in lines[1:5]] == [
        f"digits * 1 AVAILABLE {VERDICT}",
        "digits * 2 LOADING",
        "colors 3 AVAILABLE",
        "colors 4 FAILED saved_model.pb: no such file",
    ]
    assert lines[5].startswith("* the default model")
    assert main(["--target", fake.target, "models", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["models"][0]["isDefault"] is True
    assert document["models"][1]["versions"][1] == {
        "version": "4",
        "state": "STATE_FAILED",
        "reason": "saved_model.pb: no such file",
        "costVerdict": "",
    }


def test_predict_with_model_version_and_top_k(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [str(png(tmp_path / "a.png", "green")), str(png(tmp_path / "b.jpg", "red"))]
    argv = ["--target", fake.target, "predict", *files, "--model", "colors", "--version", "3", "--top-k", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "top"
    assert lines[1].split()[:2] == [files[0], "green"]
    assert "green 0." in lines[1] and ", " in lines[1]  # two classes, by name, highest first
    assert lines[-1].startswith("model colors version 3, request cost $")
    monkeypatch.setenv("COSTSERVE_MODEL", "colors")
    assert main(["--target", fake.target, "predict", files[1], "--top-k", "3", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model_name"] == "colors" and document["model_version"] == "3"
    top = document["predictions"][0]["top"]
    assert [entry["label"] for entry in top][0] == "red" and [entry["class"] for entry in top][0] == 0
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    sent = [(r.model_name, r.model_version, r.top_k) for r in fake.servicer.sent(pb.PredictRequest)]
    assert sent == [("colors", "3", 2), ("colors", "", 3)]


def test_info_shows_preprocessing_unknown_accuracy_and_agreement(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", fake.target, "info", "--model", "colors", "--version", "3"]) == 0
    out = capsys.readouterr().out
    assert "model colors version 3, input 32x32x3" in out
    assert "preprocessing: rgb, resize crop, scaling mean_std (mean 0.485 0.456 0.406; std 0.229 0.224 0.225)" in out
    fp32 = next(line for line in out.splitlines() if line.startswith("fp32"))
    assert "unknown" in fp32.split() and "2.000" in fp32.split()
    assert "no held-out data: accuracy unknown; int8/fp32 agreement not measured" in out
    assert main(["--target", fake.target, "info"]) == 0
    out = capsys.readouterr().out
    assert "model digits version 1" in out and "preprocessing: grayscale, resize stretch, scaling unit" in out
    assert "98.61%" in out and "int8 agrees with fp32 on 99.50% of them" in out


def test_not_found_is_a_one_line_error(fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = str(png(tmp_path / "a.png", "red"))
    for argv in (["predict", image, "--model", "cats"], ["info", "--model", "colors", "--version", "4"]):
        assert main(["--target", fake.target, *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("costserve: NOT_FOUND: ") and err.count("\n") == 1 and fake.target in err
    assert main(["--target", fake.target, "loadtest", "--model", "cats", "--inputs", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("costserve: NOT_FOUND: no model 'cats'")


# --------------------------------------------------------------------------- loadtest --inputs


def image_folder(root: Path) -> dict[str, list[Path]]:
    """red/ (3 red, 1 blue: misfiled), green/ (2, one deeper and a JPEG), blue/ (2); other files ignored."""
    files = {
        "red": [png(root / "red" / f"r{i}.png", "red", i) for i in range(3)] + [png(root / "red" / "x.png", "blue", 9)],
        "green": [png(root / "green" / "g0.png", "green"), png(root / "green" / "more" / "g1.JPG", "green")],
        "blue": [png(root / "blue" / f"b{i}.png", "blue", i) for i in range(2)],
    }
    (root / "red" / "notes.txt").write_text("not an image")
    png(root / "blue" / ".hidden.png", "red")
    png(root / ".cache" / "c.png", "red")
    return files


def test_image_folder_and_flat_folder_layouts(tmp_path: Path) -> None:
    files = image_folder(tmp_path / "classes")
    found = find_images(tmp_path / "classes")
    assert found.class_names == ["blue", "green", "red"]
    assert sorted(found.paths) == sorted(path for paths in files.values() for path in paths)
    assert found.classes is not None
    assert {path: name for path, name in zip(found.paths, found.classes)} == {
        path: name for name, paths in files.items() for path in paths
    }

    flat = [png(tmp_path / "flat" / f"{i}.png", "green", i) for i in range(3)]
    found = find_images(tmp_path / "flat")
    assert list(found.paths) == flat and found.classes is None and found.class_names == []

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("")
    with pytest.raises(ValueError, match="no PNG or JPEG files"):
        find_images(tmp_path / "empty")
    png(tmp_path / "classes" / "stray.png", "red")
    with pytest.raises(ValueError, match="both images"):
        find_images(tmp_path / "classes")
    with pytest.raises(ValueError, match="not a directory"):
        find_images(tmp_path / "missing")


def test_file_pool_sends_the_encoded_files_and_judges_by_name(tmp_path: Path) -> None:
    files = image_folder(tmp_path)
    pool = FileInputPool(find_images(tmp_path), seed=3)
    assert pool.size == 8 and pool.describe() == f"{tmp_path} (8 files, 3 classes)"
    by_bytes = {path.read_bytes(): name for name, paths in files.items() for path in paths}
    for input_id in range(pool.size):
        request = pb.PredictRequest.FromString(pool.field(input_id))
        assert by_bytes[request.images[0].encoded] == pool.class_name(input_id)
    assert pool.correct(0, pb.Prediction(label_name=pool.class_name(0) or "")) is True
    assert pool.correct(0, pb.Prediction(label_name="purple")) is False
    assert pool.paths != list(find_images(tmp_path).paths)  # shuffled, so that any prefix mixes the classes
    assert FileInputPool(find_images(tmp_path), seed=3).paths == pool.paths  # the seed decides the order

    config = LoadtestConfig(model="colors", model_version="3", images_per_request=2, seed=3)
    picker = InputPicker(pool, config, worker=0, workers=1)
    payload, ids, new = picker.request()
    request = pb.PredictRequest.FromString(payload)
    assert (request.model_name, request.model_version, len(request.images)) == ("colors", "3", 2)
    assert ids == new == [0, 1]

    flat = FileInputPool(find_images(tmp_path / "red"))  # red/ has no sub-folders with images: flat
    assert flat.classes is None and flat.correct(0, pb.Prediction(label_name="red")) is None


def test_accuracy_is_the_share_of_labelled_answers_whose_name_matches() -> None:
    config = LoadtestConfig()
    samples = Samples(latencies_s=np.array([0.01, 0.02]), predictions=4, labelled=4, correct=3, elapsed_s=1.0)
    assert StepResult(LoadStep("closed", 1), 0, [samples], config).summary()["accuracy"] == 0.75
    unlabelled = Samples(latencies_s=np.array([0.01]), predictions=2, elapsed_s=1.0)
    step = StepResult(LoadStep("closed", 1), 0, [unlabelled], config)
    assert step.summary()["accuracy"] is None
    table = format_table(LoadReport("t", "m version 1", config, [step], inputs="photos (2 files, no labels)"))
    assert "from photos (2 files, no labels)" in table
    row = next(line for line in table.splitlines() if line.startswith("concurrency 1"))
    assert row.split()[-3] == "-"  # acc %


def run_colors(fake: FakeServer, folder: Path, **settings: Any) -> LoadReport:
    config = LoadtestConfig(target=fake.target, inputs=str(folder), model="colors", warmup_s=0.0, **settings)
    return run_loadtest(config)


@pytest.mark.parametrize("settings", [{}, {"stream": True, "images_per_request": 2}], ids=["unary", "stream"])
def test_loadtest_sends_the_files_and_reports_accuracy(
    fake: FakeServer, tmp_path: Path, settings: dict[str, Any]
) -> None:
    files = image_folder(tmp_path / "photos")
    per_request = settings.get("images_per_request", 1)
    report = run_colors(fake, tmp_path / "photos", requests=8 // per_request, **settings)
    row = report.steps[0].summary()
    assert row["ok"] == 8 // per_request and row["predictions"] == 8 and row["errors"] == {}
    assert row["accuracy"] == 7 / 8  # the blue image filed under red/ is answered "blue"
    assert report.model == "colors version 3" and report.inputs == f"{tmp_path / 'photos'} (8 files, 3 classes)"
    assert report.to_dict()["settings"]["inputs"] == str(tmp_path / "photos") and report.notes == []
    table = format_table(report)
    assert next(line for line in table.splitlines() if line.startswith("concurrency 1")).split()[-3] == "87.5"

    predicts = fake.servicer.sent(pb.PredictRequest)
    assert {(r.model_name, r.model_version) for r in predicts} == {("colors", "")}
    sent = sorted(image.encoded for request in predicts for image in request.images)
    assert sent == sorted(path.read_bytes() for paths in files.values() for path in paths)  # each file once


def test_loadtest_on_a_flat_folder_has_no_accuracy_and_processes_share_the_files(
    fake: FakeServer, tmp_path: Path
) -> None:
    for i in range(6):
        png(tmp_path / f"{i}.png", "red", i)
    report = run_colors(fake, tmp_path, concurrency=(2,), requests=6, processes=2, model_version="3")
    step = report.steps[0]
    assert [part.requests for part in step.workers] == [3, 3]
    row = step.summary()
    assert row["predictions"] == 6 and row["accuracy"] is None
    assert report.inputs.endswith("(6 files, no labels)")
    sent = [request.images[0].encoded for request in fake.servicer.sent(pb.PredictRequest)]
    assert len(set(sent)) == 6  # striped over the processes: no file twice
    assert {request.model_version for request in fake.servicer.sent(pb.PredictRequest)} == {"3"}


def test_class_folders_that_are_not_labels_are_pointed_out(fake: FakeServer, tmp_path: Path) -> None:
    png(tmp_path / "red" / "a.png", "red")
    png(tmp_path / "crimson" / "b.png", "red")
    report = run_colors(fake, tmp_path, requests=2)
    assert report.steps[0].summary()["accuracy"] == 0.5
    (note,) = report.notes
    assert "1 class folder(s) are not labels of colors version 3 (crimson)" in note
    assert "note: 1 class folder(s)" in format_table(report)


def test_loadtest_cli_with_inputs_needs_no_scikit_learn(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else find_spec(name, *a)
    )
    image_folder(tmp_path)
    monkeypatch.setenv("COSTSERVE_MODEL", "colors")
    argv = ["--target", fake.target, "loadtest", "--inputs", str(tmp_path), "--requests", "8", "--warmup", "0"]
    assert main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["steps"][0]["accuracy"] == 7 / 8 and document["settings"]["model"] == "colors"
    assert document["inputs"].endswith("(8 files, 3 classes)") and document["notes"] == []
    assert main(["--target", fake.target, "loadtest", "--inputs", str(tmp_path / "red" / "notes.txt")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- cost --by-model

#: Two models and a call refused before its model was known; the figures are easy to check by hand.
MODEL_METRICS = """\
# TYPE costserve_requests_total counter
costserve_requests_total{model="digits",method="Predict",precision="fp32",code="OK"} 90.0
costserve_requests_total{model="digits",method="Predict",precision="fp32",code="RESOURCE_EXHAUSTED"} 10.0
costserve_requests_total{model="colors",method="Predict",precision="int8",code="OK"} 40.0
costserve_requests_total{model="",method="Predict",precision="auto",code="NOT_FOUND"} 5.0
# TYPE costserve_images_total counter
costserve_images_total{model="digits",precision="fp32",cache="hit"} 20.0
costserve_images_total{model="digits",precision="fp32",cache="miss"} 80.0
costserve_images_total{model="colors",precision="int8",cache="miss"} 40.0
costserve_images_total{model="colors",precision="fp32",cache="miss"} 10.0
# TYPE costserve_cost_usd_total counter
costserve_cost_usd_total{model="digits",resource="cpu",precision="fp32"} 0.006
costserve_cost_usd_total{model="digits",resource="memory",precision="fp32"} 0.003
costserve_cost_usd_total{model="digits",resource="network",precision="fp32"} 0.001
costserve_cost_usd_total{model="colors",resource="cpu",precision="int8"} 0.02
costserve_cost_usd_total{model="colors",resource="memory",precision="int8"} 0.008
costserve_cost_usd_total{model="colors",resource="network",precision="fp32"} 0.002
# TYPE costserve_cpu_seconds_total counter
costserve_cpu_seconds_total{model="digits",precision="fp32",phase="inference"} 4.0
# TYPE costserve_provisioned_cost_usd_total counter
costserve_provisioned_cost_usd_total 0.05
# TYPE costserve_price_usd gauge
costserve_price_usd{resource="cpu"} 0.036
# TYPE costserve_model_info gauge
costserve_model_info{name="colors",version="3",precision="fp32",format="saved_model",accuracy="unknown"} 1.0
"""


def test_by_model_splits_requests_predictions_and_cost() -> None:
    samples = parse_metrics_text(MODEL_METRICS)
    rows, total = model_figures(samples)
    assert [row.model for row in rows] == ["colors", "digits", ""]  # most cost first
    colors, digits, unresolved = rows
    assert (colors.requests, colors.failed_requests, colors.predictions, colors.cache_hits) == (40, 0, 50, 0)
    assert colors.cost_usd == pytest.approx(0.03) and colors.cost_share == pytest.approx(0.75)
    assert colors.per_1m_usd == pytest.approx(1e6 * 0.03 / 50) and colors.per_1k_usd == pytest.approx(0.6)
    assert colors.predictions_by_precision == {"fp32": 10, "int8": 40}
    assert colors.cost_by_resource_usd == pytest.approx({"cpu": 0.02, "memory": 0.008, "network": 0.002})
    assert (digits.requests, digits.failed_requests, digits.predictions, digits.cache_hits) == (100, 10, 100, 20)
    assert digits.per_1m_usd == pytest.approx(100.0) and digits.cost_share == pytest.approx(0.25)
    assert (unresolved.requests, unresolved.failed_requests, unresolved.predictions) == (5, 5, 0)
    assert unresolved.per_1m_usd is None and unresolved.cost_usd == 0
    assert (total.model, total.requests, total.failed_requests, total.predictions) == ("all", 145, 15, 150)
    assert total.cost_usd == pytest.approx(0.04) and total.cost_share == pytest.approx(1.0)
    assert total.predictions_by_precision == {"fp32": 110, "int8": 40}

    text = format_models(rows, total, "test", "totals since the server started")
    table = {line.split()[0]: line.split() for line in text.splitlines()[3:7]}
    assert table["colors"][:4] == ["colors", "40", "0", "50"] and "75%" in table["colors"]
    assert table["digits"][:5] == ["digits", "100", "10", "100", "20"] and "$100.0" in table["digits"]
    assert table["(none)"][:4] == ["(none)", "5", "5", "0"] and table["all"][:2] == ["all", "145"]
    assert "(none): no model name" in text

    # The per-precision report still adds up every model, and an unknown accuracy is no accuracy.
    report = compute_report(samples, "test", "totals since the server started")
    fp32, int8 = report.precisions
    assert (fp32.predictions, int8.predictions) == (110, 40) and fp32.accuracy is None


def test_metrics_without_a_model_label_report_as_one_unnamed_model() -> None:
    old = "\n".join(
        line.replace('model="digits",', "").replace('model="colors",', "").replace('model="",', "")
        for line in MODEL_METRICS.splitlines()
    )
    rows, total = model_figures(parse_metrics_text(old))
    assert [row.model for row in rows] == [""]
    assert (rows[0].requests, rows[0].predictions) == (145, 150) and rows[0].cost_usd == pytest.approx(0.04)
    assert total.predictions == 150
    rows, total = model_figures(parse_metrics_text("# TYPE up gauge\nup 1.0\n"))
    assert rows == [] and (total.requests, total.predictions, total.per_1m_usd) == (0, 0, None)
    assert "no request metrics yet" in format_models(rows, total, "test", "now")


def test_by_model_from_metrics_url_and_prometheus(
    http_server: Callable[[Route], str], capsys: pytest.CaptureFixture[str]
) -> None:
    samples = parse_metrics_text(MODEL_METRICS)
    url = http_server(lambda path, query: (200, MODEL_METRICS)) + "/metrics"
    assert main(["cost", "--metrics-url", url, "--by-model", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [row["model"] for row in document["models"]] == ["colors", "digits", ""]
    assert document["total"]["requests"] == 145 and document["period"] == "totals since the server started"
    assert "model" in document["definitions"]
    assert main(["cost", "--metrics-url", url, "--by-model"]) == 0
    assert capsys.readouterr().out.startswith(f"costserve cost by model: {url}, totals since the server started")

    # Prometheus sums by (model, ...): answer each query with the series it would return.
    queries = prometheus_queries("30m")
    assert "model" in queries["costserve_requests_total"] and "model" in queries["costserve_cost_usd_total"]
    answers = {query: samples.get(name, []) for name, query in queries.items()}

    def prometheus(path: str, query: dict[str, str]) -> tuple[int, str]:
        result = [{"metric": labels, "value": [1.7e9, repr(value)]} for labels, value in answers[query["query"]]]
        return 200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})

    base = http_server(prometheus)
    assert main(["cost", "--prometheus", base, "--window", "30m", "--by-model", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["period"] == "increase over the last 30m"
    assert {row["model"]: row["predictions"] for row in document["models"]} == {"colors": 50, "digits": 100, "": 0}
