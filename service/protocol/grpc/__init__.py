"""gRPC: the `anomaly.v1` servicer and server (`server`), the Open Inference Protocol (`oip`),
admission of calls (`admission`), API keys and TLS (`security`) and channel options (`options`)."""
