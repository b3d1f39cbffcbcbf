"""Promotion through the stock MLflow UI, in a real browser: Playwright drives Debian's
Chromium against `mlflow server` on a test store; an engineer adds `champion` to another
version and sets a threshold tag, and a running gRPC server follows both. The version page
is saved in the test's temporary folder, and as `docs/mlflow-version-page.png` with
`ANOMALY_DOCS_SCREENSHOT=1`.

Needs Chromium at /usr/bin/chromium (Debian's `chromium` package; `.ci/run` installs it)
and the `playwright` package (the `dev` extra); skipped with the reason where either is
missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, Store, mlflow_server_process, register_copy, wait_for
from mlflow import MlflowClient

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import start_server

SCREENSHOT = Path(__file__).parents[2] / "docs" / "mlflow-version-page.png"
MODEL = "ui-promotion"

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                             "(pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: Debian's chromium package is "
                                                              "not installed (apt-get install chromium)")


def _reference_set(store: Store, client: MlflowClient, tmp_path: Path) -> list:
    """The session model's reference set, as the parts to log with another version."""
    from registry.mlflow_registry import KnownPart
    from service.promotion.rules import read_manifest

    run_id = client.get_model_version(store.model_name, store.version).run_id
    local = Path(client.download_artifacts(run_id, "reference", str(tmp_path)))
    return [KnownPart(local / i["file"], i["category"], i["expect"]) for i in read_manifest(local)]


def test_promotion_and_a_threshold_set_in_the_mlflow_ui_reach_a_running_server(
        store: Store, good_and_defect, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    first = register_copy(store, tmp_path, "ui-first", model_name=MODEL, metrics={"image_auroc": 0.9},
                          reference=_reference_set(store, client, tmp_path))
    second = register_copy(store, tmp_path, "ui-second", model_name=MODEL, metrics={"image_auroc": 0.9},
                           reference=_reference_set(store, client, tmp_path / "second"))
    client.set_registered_model_alias(MODEL, "champion", first)
    image = good_and_defect[1][0].read_bytes()
    category = good_and_defect[1][0].parent.parent.parent.name
    server, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                  model=MODEL, env={"ANOMALY_POLL_INTERVAL_S": "0.3"})
    try:
        with mlflow_server_process(store.tracking_uri, store.home) as (url, _), \
                grpc.insecure_channel(target) as channel, sync_api.sync_playwright() as pw:
            stub = pb_grpc.AnomalyDetectionStub(channel)
            score = lambda: stub.Score(pb.ScoreRequest(encoded=image, category=category), timeout=30)  # noqa: E731
            assert score().model.version == first
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2000})  # the whole version page
            page.goto(f"{url}/#/models/{MODEL}/versions/{second}")

            # Promote: add the alias `champion` to the second version and save.
            page.get_by_title("Edit aliases").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_role("combobox").fill("champion")
            page.keyboard.press("Enter")
            dialog.get_by_role("button", name="Save aliases").click()
            dialog.wait_for(state="hidden")
            wait_for(lambda: score().model.version == second, what="the server to follow champion")
            assert client.get_model_version(MODEL, second).tags["gate.status"] == "passed"
            assert str(client.get_model_version_by_alias(MODEL, "champion").version) == second

            # A live threshold: add the tag (a small change the gate passes), then edit its value
            # in the table to one that would pass every part: refused, the first one stays.
            safe = f"{score().threshold * 0.999:.9g}"
            page.get_by_test_id("tags-form-input-name").fill(f"threshold.{category}")
            page.get_by_test_id("tags-form-input-value").fill(safe)
            page.get_by_test_id("add-tag-button").click()
            tag = f"threshold.{category}"
            wait_for(lambda: score().threshold_source == tag, what="the server to follow the tag")
            assert score().threshold == pytest.approx(float(safe))
            row = page.locator(f'tr[data-row-key="threshold.{category}"]')  # gate.reason's row names it too
            row.get_by_test_id("editable-table-button-edit").click()
            editor = row.get_by_role("textbox")
            editor.fill("1000000")
            row.get_by_role("button", name="Save").click()
            get = lambda: stub.GetModel(pb.GetModelRequest(model=MODEL, alias="champion"), timeout=10)  # noqa: E731
            wait_for(lambda: "absurd" in get().last_error, what="the edited tag refused")
            assert score().threshold == pytest.approx(float(safe))
            assert score().model.version == second
            page.reload()
            page.get_by_title("champion", exact=True).wait_for()  # the alias chip: the page has loaded
            page.locator(f'tr[data-row-key="threshold.{category}"]').scroll_into_view_if_needed()
            docs = os.environ.get("ANOMALY_DOCS_SCREENSHOT") == "1"
            shot = SCREENSHOT if docs else tmp_path / SCREENSHOT.name
            page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1040, "height": 1220})
            assert shot.stat().st_size > 20_000
            browser.close()
    finally:
        server.stop()
    tags = client.get_model_version(MODEL, second).tags
    assert tags[f"threshold.{category}"] == "1000000" and tags["gate.status"] == "refused"
