"""A KServe `ModelServer` serving the same anomaly model, for the peers benchmark.

Runs in its own virtual environment (KServe pins protobuf 6, this project uses 7; see
`make peers-venv`), with the repository on `PYTHONPATH` so it scores through the very
same engine and pre-processing as our server (`service.runtime.engine.OnnxModel`): the comparison
measures the serving framework, not the model code. KServe's documented custom-model
pattern: a `kserve.Model` with a synchronous `predict`, over two protocols:

- V1 REST, images as base64::

    POST /v1/models/anomaly:predict  {"instances": [{"b64": "<PNG bytes, base64>"}]}

- V2 (Open Inference Protocol) gRPC `ModelInfer`, the PNG bytes as a `BYTES` tensor of
  shape [N] in `raw_input_contents` (the same request as our server's V2 path); answers
  the `score` tensor.

    python loadtests/kserve_model.py --model_dir <MLflow model folder> --http_port 8080 \
        --grpc_port 8081 --workers 2
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import kserve

from service.repository.artifact import read_model_dir
from service.runtime.engine import OnnxModel
from service.settings import Settings


class AnomalyModel(kserve.Model):
    """One image per instance → its anomaly score and decision."""

    def __init__(self, name: str, model_dir: str, intra_op_threads: int = 1) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.intra_op_threads = intra_op_threads
        self.engine: OnnxModel | None = None
        self.load()

    def load(self) -> bool:
        """Check the model folder; the session itself opens in each worker process on first
        use (KServe pickles the model into its worker processes, and a session cannot be)."""
        read_model_dir(Path(self.model_dir))
        self.ready = True
        return self.ready

    def __getstate__(self) -> dict:  # noqa: D105
        return {**self.__dict__, "engine": None}

    def predict(self, payload: dict | kserve.InferRequest,  # noqa: D102
                headers: dict[str, str] | None = None) -> dict | kserve.InferResponse:
        import numpy as np

        if self.engine is None:
            self.engine = OnnxModel(*read_model_dir(Path(self.model_dir)), spinning=False,
                                    intra_op_threads=self.intra_op_threads)
        v2 = isinstance(payload, kserve.InferRequest)
        if v2:
            encoded = [bytes(b) for b in payload.inputs[0].as_numpy().reshape(-1)]
        else:
            encoded = [base64.b64decode(inst["b64"]) for inst in payload["instances"]]
        batch = np.stack([self.engine.prepare_encoded(b) for b in encoded])
        scores, _ = self.engine.infer(batch)
        if v2:
            out = kserve.InferOutput("score", [len(scores)], "FP32", scores.astype(np.float32))
            return kserve.InferResponse(response_id=payload.id or "", model_name=self.name,
                                        infer_outputs=[out], use_binary_outputs=True)
        return {"predictions": [
            {"score": float(s), "is_anomalous": self.engine.decide(float(s), None, "").is_anomalous}
            for s in scores]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", required=True, help="MLflow ONNX model folder")
    args, _ = parser.parse_known_args()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=True, enable_latency_logging=False).start(
        [AnomalyModel(args.model_name or "anomaly", args.model_dir,
                      # our server's rule: the cores shared among the concurrent calls
                      Settings(workers=args.workers, max_batch_size=1).intra_op_threads)])
