"""Generated gRPC/protobuf stubs of the Open Inference Protocol (package `inference`)."""
