"""Python SDK and the `anomaly` command line."""
