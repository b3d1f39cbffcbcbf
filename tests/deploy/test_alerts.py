"""The alert rules and the Grafana dashboard that ship in deploy/: checked, unit-tested, and held to
the metrics a real server and gateway export.

- `promtool check rules` and `promtool test rules` on deploy/prometheus (promtool: Debian's
  `prometheus` package, unpacked by `make promtool`; the two tests skip, saying so, where it is absent);
- every alert has a unit-test case where it fires and one where it stays silent, a severity, a summary,
  a description and a runbook naming a docs section that exists;
- every metric the dashboard and the rules query is one that a real server or gateway exposes, scraped
  from their `/metrics` after scoring real images, with the labels the queries use; the histogram
  bucket bounds the latency objectives name exist.

A family with labels and no child yet has no samples, but prometheus_client still announces it
(`# HELP`/`# TYPE`), so the names are compared with the families the scrape declares: a query naming
`anomaly_request_seconds` (the old name) or a typo fails.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import metric_sum, wait_for
from prometheus_client.parser import text_string_to_metric_families

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_gateway, start_server

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "serving-dashboard.json"
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus adds to every scraped series (the target's), and the histogram bucket label.
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}
SELECTOR = re.compile(r'([a-zA-Z_:][\w:]*)\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def find_promtool() -> str | None:
    """The promtool on PATH, or where `make promtool` unpacks it (the virtual environment's bin)."""
    found = shutil.which("promtool")
    if found:
        return found
    local = Path(sys.prefix) / "bin" / "promtool"
    return str(local) if local.is_file() else None


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_promtool()
    if path is None:
        pytest.skip("promtool is not installed (`make promtool` unpacks it from Debian's `prometheus` "
                    "package): the alert rules are not checked by Prometheus here")
    return path


def alerting_rules() -> list[dict]:
    """Every alerting rule of alerts.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (in rows too) and query variables."""
    model = json.loads(DASHBOARD.read_text())
    panels = [p for top in model["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    for var in model["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            assert found, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
            exprs.append(found.group(1))
    return exprs


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


# -- reading PromQL well enough to name what it queries ----------------------------------------------


def series_names(expr: str) -> set[str]:
    """The metric (and recorded series) names `expr` selects: identifiers that are not functions,
    keywords, label names or inside strings, durations and grouping clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for found in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])", text):
        name = found.group(1)
        if name.lower() in PROMQL_WORDS or re.match(r"\s*\(", text[found.end():]):
            continue
        names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: value}) of every `metric{…}` selector (matcher values as written)."""
    return [(m.group(1), dict(MATCHER.findall(m.group(2)))) for m in SELECTOR.finditer(expr)]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for found in GROUPING.finditer(expr) for label in found.group(1).split(",")
            if label.strip()}


class Exposition:
    """What Prometheus would scrape: the series names every declared family gives, and the label
    names and values of the samples present."""

    SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("", "_sum", "_count"),
                "gaugehistogram": ("_bucket", "_gsum", "_gcount")}

    def __init__(self, texts: Iterable[str]) -> None:
        self.series: set[str] = set()
        self.labels: dict[str, dict[str, set[str]]] = {}
        for text in texts:
            for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
                self.series.update(self.declared(name, kind))
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    self.series.add(sample.name)
                    seen = self.labels.setdefault(sample.name, {})
                    for label, value in sample.labels.items():
                        seen.setdefault(label, set()).add(value)

    @classmethod
    def declared(cls, name: str, kind: str) -> set[str]:
        if kind == "counter":
            base = name.removesuffix("_total")
            return {f"{base}_total", f"{base}_created"}
        return {name + suffix for suffix in cls.SUFFIXES.get(kind, ("",))}

    def problems(self, exprs: Iterable[str], recorded: set[str], where: str) -> list[str]:
        """Names not exported (nor recorded by alerts.yml), labels no sample of the series carries,
        `le` bounds the histogram does not have."""
        found: list[str] = []
        for expr in exprs:
            names = series_names(expr)
            for name in sorted(names - self.series - recorded):
                found.append(f"{where}: {name} is not exported ({expr!r})")
            sampled = [self.labels[n] for n in names if n in self.labels]
            if sampled and len(sampled) == len(names):  # every series has samples: its labels are known
                known = TARGET_LABELS.union(*sampled)
                for label in sorted(grouping_labels(expr) - known):
                    found.append(f"{where}: no series of {sorted(names)} has a label {label!r} ({expr!r})")
            for name, matchers in selectors(expr):
                if name not in self.labels:
                    continue
                for label in sorted(set(matchers) - TARGET_LABELS - set(self.labels[name])):
                    found.append(f"{where}: {name} has no label {label!r} ({expr!r})")
                if "le" in matchers and matchers["le"] not in self.labels[name].get("le", set()):
                    found.append(f"{where}: {name} has no bucket le={matchers['le']!r} "
                                 f"(bounds: {sorted(self.labels[name].get('le', set()))})")
        return found


# -- promtool --------------------------------------------------------------------------------------


def test_promtool_checks_the_rules(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@pytest.mark.heavy  # runs Prometheus' rule tests, about 12 s: not in the fast loop
def test_promtool_unit_tests_pass(promtool: str) -> None:
    done = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=300, cwd=RULE_TESTS.parent)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


# -- the rules' own shape (no promtool needed) -------------------------------------------------------


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    cases = [case for test in doc["tests"] for case in test.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alerting_rules()}
    assert len(alerts) == len(alerting_rules()), "alert names must be unique"
    assert alerts - firing == set(), "alerts with no case where they fire"
    assert alerts - silent == set(), "alerts with no case where they stay silent"
    assert (firing | silent) - alerts == set(), "cases naming no alert of alerts.yml"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_is_labelled_and_has_a_runbook_that_exists() -> None:
    for rule in alerting_rules():
        name, notes = rule["alert"], rule.get("annotations", {})
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        assert notes.get("summary") and notes.get("description"), name
        doc, _, anchor = notes.get("runbook", "").partition("#")
        assert (ROOT / doc).is_file() and anchor, f"{name}: runbook {notes.get('runbook')!r}"
        headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(), re.MULTILINE)
        assert anchor in {github_anchor(h) for h in headings}, f"{name}: no section #{anchor} in {doc}"


def test_the_name_check_catches_unexported_names_labels_and_bounds() -> None:
    """The checker used against the real scrape below fails on what it should fail on."""
    text = ("# HELP anomaly_request_duration_seconds t\n# TYPE anomaly_request_duration_seconds histogram\n"
            'anomaly_request_duration_seconds_bucket{le="0.32"} 1.0\n'
            'anomaly_request_duration_seconds_bucket{le="+Inf"} 1.0\n'
            "anomaly_request_duration_seconds_count 1.0\nanomaly_request_duration_seconds_sum 0.1\n"
            "# HELP anomaly_requests_total r\n# TYPE anomaly_requests_total counter\n"
            "# HELP anomaly_queue_depth q\n# TYPE anomaly_queue_depth gauge\n")
    exposition = Exposition([text])
    good = ['histogram_quantile(0.99, sum by (le) (rate(anomaly_request_duration_seconds_bucket{job=~"$job"}'
            '[$__rate_interval])))', 'sum by (code) (rate(anomaly_requests_total{code="OK"}[5m])) > 1e3',
            "max(anomaly_queue_depth) and on (job) job:anomaly_score_errors:ratio_rate5m",
            '1 - (sum(rate(anomaly_request_duration_seconds_bucket{le="0.32"}[1h])))']
    assert exposition.problems(good, {"job:anomaly_score_errors:ratio_rate5m"}, "t") == []
    bad = {'rate(anomaly_request_seconds_bucket{stage="total"}[5m])': "anomaly_request_seconds_bucket is not",
           "anomaly_requests_totl": "anomaly_requests_totl is not",
           "job:anomaly_score_errors:ratio_rate5m": "job:anomaly_score_errors:ratio_rate5m is not",
           'rate(anomaly_request_duration_seconds_count{stage="total"}[5m])': "has no label 'stage'",
           "sum by (stage) (rate(anomaly_request_duration_seconds_sum[5m]))": "has a label 'stage'",
           'anomaly_request_duration_seconds_bucket{le="0.3"}': "has no bucket le='0.3'"}
    for expr, problem in bad.items():
        found = exposition.problems([expr], set(), "t")
        assert len(found) == 1 and problem in found[0], (expr, found)


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    model = json.loads(DASHBOARD.read_text())
    assert model["uid"] and model["title"] and model["schemaVersion"] >= 36
    variables = {v["name"]: v for v in model["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["datasource"] == panel["datasource"]
                                        for t in panel["targets"]), panel["title"]
        for query in (t["expr"] for t in panel["targets"]):
            used = set(re.findall(r"\$(\w+)", query)) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']}: unknown variables {used - set(variables)}"
    titles = " ".join(p["title"].lower() for p in model["panels"])
    for topic in ("status code", "p50 / p99", "stage", "batch", "queue", "admission", "non-finite",
                  "served version", "spool", "inspection rows", "gateway requests", "gateway latency"):
        assert topic in titles, f"no panel on {topic}"


# -- against a real server and gateway --------------------------------------------------------------

# Series that must have samples once a few images were scored over gRPC and HTTP with the inspection
# log on: the dashboard's main panels and the rules' SLIs draw them. (`anomaly_queue_depth` has a child
# only once the batcher queued an image, which single calls on an idle server may skip.)
SAMPLED = ["anomaly_requests_total", "anomaly_request_duration_seconds_bucket",
           "anomaly_request_stage_duration_seconds_bucket", "anomaly_batch_images_bucket",
           "anomaly_inference_runs_total", "anomaly_model_info", "anomaly_served_version",
           "anomaly_alias_serving",
           "anomaly_inspection_spool_fill_ratio", "anomaly_inspection_spool_bytes",
           "anomaly_inspection_rows_total", "anomaly_decode_memory_bytes"]
GATEWAY_SAMPLED = ["anomaly_http_requests_total", "anomaly_http_request_duration_seconds_bucket"]


def _v2_infer_body(data: bytes) -> dict:
    return {"id": "dashboard", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                           "data": [{"b64": base64.b64encode(data).decode()}]}]}


def test_dashboard_and_rules_query_only_what_a_real_server_and_gateway_export(
        store, good_and_defect, tmp_path: Path) -> None:
    metrics_port = free_port()
    env = {"ANOMALY_METRICS_PORT": str(metrics_port), "ANOMALY_INSPECTION_LOG": "true",
           "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{tmp_path / 'inspections.db'}",
           "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")}
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  env=env)
    gateway = None
    try:
        gateway, base = start_gateway(target, tmp_path / "gateway.log")
        good, defect = good_and_defect
        with AnomalyClient(target) as client:
            for path in (good[0], defect[0]):
                assert client.score(path.read_bytes()).request_id
        with AnomalyClient(base) as client:
            assert client.score(good[1].read_bytes()).request_id
        answer = httpx.post(f"{base}/v2/models/{store.model_name}/infer",
                            json=_v2_infer_body(defect[1].read_bytes()), timeout=60)
        assert answer.status_code == 200, answer.text
        server_url, gateway_url = f"http://127.0.0.1:{metrics_port}/metrics", f"{base}/metrics"
        wait_for(lambda: metric_sum(server_url, 'anomaly_inspection_rows_total{outcome="shipped"}', 0) >= 1,
                 60, "the inspection log to ship the decisions")
        server_text, gateway_text = httpx.get(server_url).text, httpx.get(gateway_url).text
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()

    server_side, gateway_side = Exposition([server_text]), Exposition([gateway_text])
    assert [n for n in SAMPLED if n not in server_side.labels] == [], "server series without samples"
    assert [n for n in GATEWAY_SAMPLED if n not in gateway_side.labels] == [], \
        "gateway series without samples"
    routes = gateway_side.labels["anomaly_http_requests_total"]["route"]
    scoring = re.compile(r"/v1/score|/v2/models/.+/infer")  # the rules' and dashboard's scoring routes
    assert {"/v1/score", "/v2/models/{model}/infer"} <= {r for r in routes if scoring.fullmatch(r)}, routes
    assert "OK" in server_side.labels["anomaly_requests_total"]["code"]

    exposition = Exposition([server_text, gateway_text])
    recorded = recorded_names()
    problems = (exposition.problems(dashboard_queries(), set(), DASHBOARD.name)
                + exposition.problems(rule_queries(), recorded, RULES.name))
    assert problems == [], "\n".join(problems)
    queried = set().union(*map(series_names, dashboard_queries() + rule_queries()))
    assert "anomaly_request_duration_seconds_bucket" in queried
    assert not any(name.startswith("anomaly_request_seconds") for name in queried)
