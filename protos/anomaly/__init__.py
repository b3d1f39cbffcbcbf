"""Generated gRPC/protobuf package `anomaly` (from protos/anomaly)."""
