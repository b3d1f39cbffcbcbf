"""edge-anomaly's Python SDK, as plant software imports it.

Example::

    from edge_anomaly_client import AnomalyClient

    with AnomalyClient("127.0.0.1:50051") as client:      # gRPC; "http://host:8000" for HTTP
        result = client.score("part.png", category="brick", request_id="SN-0001")

`AnomalyClient` and `AsyncAnomalyClient` (the same methods with `await`), the result types
(`ScoreResult`, `ModelInfo`, `ModelRef`, `FeedbackResult`) and `AnomalyError`. Installable
alone as the `edge-anomaly-client` distribution (`make client-dist`), which carries the wire
contract it speaks (`anomaly`: the protos and their stubs) and nothing of the server.
"""

from edge_anomaly_client.sdk import (
    IMAGE_SUFFIXES,
    AnomalyClient,
    AnomalyError,
    AsyncAnomalyClient,
    FeedbackResult,
    ModelInfo,
    ModelRef,
    ScoreResult,
)

__all__ = ["IMAGE_SUFFIXES", "AnomalyClient", "AnomalyError", "AsyncAnomalyClient", "FeedbackResult",
           "ModelInfo", "ModelRef", "ScoreResult"]
