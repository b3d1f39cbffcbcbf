# Task file. `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS_STAMP := .venv-peers/.installed
MLSERVER_STAMP := .venv-mlserver/.installed

.PHONY: demo test lint format protos venv peers-venv mlserver-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The main job end to end on the bundled sample data.
demo: $(STAMP)
	$(BIN)/anomaly demo

## The test suite (what CI runs).
test: $(STAMP) $(PEERS_STAMP) $(MLSERVER_STAMP)
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

## MLServer with its MLflow runtime, the third peer of the benchmark (it pins its own MLflow, FastAPI
## and protobuf). uvloop < 0.22: MLServer 1.7.1's worker processes do not start with 0.22's get_event_loop.
$(MLSERVER_STAMP): Makefile
	test -x .venv-mlserver/bin/python || $(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install --quiet mlserver==1.7.1 mlserver-mlflow==1.7.1 onnxruntime 'uvloop<0.22'
	touch $(MLSERVER_STAMP)

mlserver-venv: $(MLSERVER_STAMP)

## Regenerate the gRPC stubs from protos/anomaly/v1/anomaly.proto and protos/anomaly/oip/inference.proto.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/anomaly/v1/anomaly.proto protos/anomaly/oip/inference.proto

clean:
	rm -rf .demo runs .pytest_cache .ruff_cache
