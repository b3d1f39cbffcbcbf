"""Inference service: engine, model repository, gRPC server and HTTP gateway (no torch)."""
