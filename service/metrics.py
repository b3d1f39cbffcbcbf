"""Prometheus metrics of the inference server (the gateway has its own in `gateway.py`).

Exposed by `start_http_server(settings.metrics_port)` when the port is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)

REQUESTS = Counter("anomaly_requests_total", "Score requests by gRPC status code",
                   ["model", "code"])
# The whole request and its stages are two series, so that summing over `stage` adds up
# the stages and never counts a request twice.
LATENCY = Histogram("anomaly_request_duration_seconds", "Time to answer a scored request, admission to "
                    "decision", buckets=LATENCY_BUCKETS)
STAGE_LATENCY = Histogram("anomaly_request_stage_duration_seconds", "Time per request stage",
                          ["stage"], buckets=LATENCY_BUCKETS)  # stage: decode | queue | inference
BATCH_SIZE = Histogram("anomaly_batch_images", "Images per ONNX Runtime call",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
INFERENCE_RUNS = Counter("anomaly_inference_runs_total",
                         "ONNX Runtime calls by session (adaptive execution): solo = all cores for a "
                         "call alone, shared = one thread per concurrent call", ["session"])
QUEUE_DEPTH = Gauge("anomaly_queue_depth", "Images waiting for inference", ["model"])
MODEL_INFO = Gauge("anomaly_model_info", "1 for each model version loaded (an info metric: join on its "
                   "labels)",
                   ["name", "version", "architecture", "variant", "provider"])
SERVED_VERSION = Gauge("anomaly_served_version", "Version a watched alias currently serves",
                       ["name", "alias"])
ALIAS_SERVING = Gauge("anomaly_alias_serving", "1 when a watched alias serves a version, 0 while it "
                      "serves none (from start-up until its first version loads)", ["name", "alias"])
LOAD_FAILURES = Counter("anomaly_model_load_failures_total",
                        "Failed attempts to load a model version", ["name", "alias"])
REPRODUCTION = Counter("anomaly_reproduction_checks_total", "Versions checked against the scores recorded "
                       "when they were built, by result (reproduced, refused, unrecorded)",
                       ["name", "result"])
SWAPS = Counter("anomaly_model_swaps_total", "Alias moves followed", ["name", "alias"])
NONFINITE = Counter("anomaly_nonfinite_outputs_total",
                    "Requests refused because the model produced a NaN/inf score or map",
                    ["name", "version"])
ADMISSION_REFUSALS = Counter("anomaly_admission_refusals_total",
                             "Requests refused before decoding, by reason", ["reason"])
HTTP_BODY_TIMEOUTS = Counter("anomaly_http_body_timeouts_total", "HTTP request bodies not in within "
                             "http_body_timeout_s: answered 408, their memory reservation freed")
DECODE_MEMORY = Gauge("anomaly_decode_memory_bytes", "Estimated bytes reserved by images being decoded")
SPOOL_BYTES = Gauge("anomaly_inspection_spool_bytes", "Decisions in the local spool not yet in the database")
SPOOL_FILL = Gauge("anomaly_inspection_spool_fill_ratio", "Spool bytes ÷ its bound")
INSPECTION_DB_ERRORS = Counter("anomaly_inspection_db_errors_total",
                               "Inspection-log shipper failures by kind",
                               ["kind"])  # unavailable (retried with backoff) | schema (an operator must act)
INSPECTION_ROWS = Counter("anomaly_inspection_rows_total", "Inspection-log rows by outcome",
                          ["outcome"])  # spooled | shipped | dead_letter | refused | damaged
GATE_VERDICTS = Counter("anomaly_promotion_gate_total", "Promotion-gate verdicts on alias moves",
                        ["name", "alias", "status"])  # passed | refused | overridden
GATE_OVERRIDES = Counter("anomaly_promotion_gate_overrides_total", "Gate judgements forced by an engineer's "
                         "override (gate.override with .by and .reason)", ["name", "alias"])
SHADOW = Counter("anomaly_shadow_decisions_total", "Challenger decisions on answered images, by whether "
                 "they agree with the answer", ["category", "outcome"])  # agree | disagree | error
EVIDENCE = Counter("anomaly_evidence_total", "Evidence for review by outcome", ["outcome"])
# outcome: kept | dropped_queue_full | dropped_write_error | evicted_size | evicted_age
EVIDENCE_REMOTE = Counter("anomaly_evidence_remote_total", "Evidence copies to the bucket "
                          "(ANOMALY_EVIDENCE_REMOTE_URI) by outcome", ["outcome"])
# outcome: copied | dropped_queue_full | failed | missed_evicted | lost_at_shutdown | pruned_days
EVIDENCE_ITEMS = Gauge("anomaly_evidence_items", "Decisions whose evidence the store holds")
EVIDENCE_BYTES = Gauge("anomaly_evidence_bytes", "Bytes the evidence store holds")
SHADOW_DROPPED = Counter("anomaly_shadow_dropped_total", "Answered images not shadowed, by reason",
                         ["reason"])
