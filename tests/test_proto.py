"""The committed costserve.v1 modules are exactly what grpc_tools.protoc makes from protos/."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_generated_modules_match_the_protos() -> None:
    # protoc runs in its own process: grpc_tools and TensorFlow each bundle a protobuf
    # C++ runtime, and running protoc in a process that has loaded TensorFlow can crash.
    check = subprocess.run(
        [sys.executable, str(REPO_ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, f"generated modules are stale: run `make proto` and commit client/v1\n{check.stderr}"
    assert "match" in check.stdout


def test_field_numbers_of_released_messages_are_stable() -> None:
    from costserve.v1 import classifier_pb2 as pb

    numbers = {
        "PredictRequest": {"images": 1, "precision": 2, "skip_cache": 3},
        "PredictResponse": {"predictions": 1, "model_version": 2, "cost": 3},
        "Prediction": {"label": 1, "score": 2, "probabilities": 3, "cache_hit": 4, "precision": 5},
        "Image": {"encoded": 1, "pixels": 2},
        "Pixels": {"shape": 1, "dtype": 2, "data": 3},
        "Cost": {"usd": 1},
    }
    for message, fields in numbers.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert {name: descriptor.fields_by_name[name].number for name in fields} == fields
    assert [value.number for value in pb.Precision.DESCRIPTOR.values] == [0, 1, 2]
    assert pb.DESCRIPTOR.package == "costserve.v1"
