# Task file. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS_STAMP := .venv-peers/.installed

.PHONY: demo test lint format protos venv peers-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The main job end to end on the bundled sample data.
demo: $(STAMP)
	$(BIN)/anomaly demo

## The test suite (what CI runs).
test: $(STAMP) $(PEERS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff check --fix .

## KServe and Triton's clients, in their own environment (they pin protobuf 6; we use 7): the peers
## benchmark and the Open Inference Protocol client tests use it.
$(PEERS_STAMP): Makefile
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet kserve 'tritonclient[grpc,http]' onnxruntime pillow numpy \
		pydantic-settings pyyaml
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

## Regenerate the gRPC stubs from protos/anomaly/v1/anomaly.proto and protos/anomaly/oip/inference.proto.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/anomaly/v1/anomaly.proto protos/anomaly/oip/inference.proto

clean:
	rm -rf .demo runs .pytest_cache .ruff_cache
