# costserve: two set-up commands on a fresh machine, `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPOSITORY ?= models

.PHONY: serve test install install-test train proto bench bench-ab bench-policy bench-reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The server's dependencies (TensorFlow, LiteRT, ...) are the `server` extra;
# `pip install costserve` alone is the client.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[server]'
	touch $@

# The test extra includes the server's. tensorflow-serving-api (TensorFlow Serving's client,
# in the protocol tests) requires the distribution named `tensorflow`; the server extra
# installs the same TensorFlow as `tensorflow-cpu`, so the client is installed without its
# dependencies rather than pull a second, 570 MB TensorFlow over the first. Its other
# dependencies, grpcio and protobuf, are costserve's own.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps 'tensorflow-serving-api==2.21.*'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## serve: install, train the default model if the repository is empty, serve every model on 127.0.0.1:50051
serve: install
	$(BIN)/costserve-server serve --model-repository $(MODEL_REPOSITORY)

## train: (re)train the default model into MODEL_REPOSITORY/digits as a new version
train: install
	$(BIN)/costserve-server train --model-dir $(MODEL_REPOSITORY)/digits

## test: install the test extras and run the whole suite
test: install-test
	$(BIN)/python -m pytest

## proto: regenerate the committed gRPC modules from protos/
proto: install-test
	$(BIN)/python protos/generate.py

## bench: throughput and latency against the gRPC ceiling, digits and a MobileNetV2 (ARGS="--only realistic" for one part); writes benchmarks/RESULTS.md
bench: install-test
	$(BIN)/python -m benchmarks.serving $(ARGS)

## bench-ab: interleaved A/B of the serving path, the working tree against REF side by side (make bench-ab REF=<commit> [ARGS=--rounds 2]); writes benchmarks/RESULTS-ab.md
ifneq ($(filter bench-ab,$(MAKECMDGOALS)),)
ifeq ($(strip $(REF)),)
$(error bench-ab needs the commit to compare against: make bench-ab REF=<commit>)
endif
endif
bench-ab: install-test
	$(BIN)/python -m benchmarks.ab --against '$(REF)' $(ARGS)

## bench-policy: one load ramp served fp32-only, int8-only and AUTO; writes benchmarks/RESULTS-policy.md
bench-policy: install-test
	$(BIN)/python -m benchmarks.policy

## bench-reliability: fuzzing, worst requests, overload, flood and SIGTERM; writes benchmarks/RESULTS-reliability.md
bench-reliability: install-test
	$(BIN)/python -m benchmarks.reliability

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info
