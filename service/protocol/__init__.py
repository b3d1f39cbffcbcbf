"""Thin protocol translators over the data plane: gRPC (`grpc`: `anomaly.v1`, the Open Inference
Protocol, admission, keys) and HTTP (`rest`: the gateway's `/v1` and `/v2` routes, body limits),
and the HTTP API inside the server process (`inprocess`)."""
