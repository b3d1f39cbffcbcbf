"""anomaly.v1: the inference contract (generated stubs beside anomaly.proto)."""
