"""`anomaly build` and `anomaly variants --from`, each in its own process against an
embedded SQLite store: every variant registered with its tags, the torch model logged with
the FP32 version and restored in a fresh process to build QAT, artifacts beside the store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from registry.data.sample import SampleSpec, make_sample_dataset

pytestmark = pytest.mark.slow

VARIANTS = ("fp32", "fp16", "ptq-int8", "qat-int8")
OPTIONS = '{"stages": [1, 2]}'  # STFPM on two pyramid levels instead of three


def _anomaly(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ANOMALY_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**env, "COLUMNS": "200",
                                                     "PYTHONPATH": str(Path(__file__).parents[2])})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """One `anomaly build` of every STFPM variant on a tiny two-category dataset, run from
    a working folder that is not the store's, with an architecture option given."""
    root = tmp_path_factory.mktemp("build")
    data = make_sample_dataset(root / "data", categories=("brick", "coffee"),
                               spec=SampleSpec(image_size=64, n_train=6, n_test_good=3, n_test_per_defect=1))
    cwd = root / "cwd"
    cwd.mkdir()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    proc = _anomaly(cwd, "build", "--data", str(data), "--epochs", "1", "--qat-epochs", "1",
                    "--input-size", "64", "--tracking-uri", uri, "--work-dir", str(root / "work"),
                    "--options", OPTIONS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "data": data, "cwd": cwd, "uri": uri, "stdout": proc.stdout}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_build_registers_every_variant_with_its_tags(built) -> None:
    client = _client(built["uri"])
    versions = sorted(client.search_model_versions("name='anomaly-detector'"), key=lambda v: int(v.version))
    assert [v.tags["variant"] for v in versions] == list(VARIANTS)
    params = client.get_run(versions[0].run_id).data.params
    assert {k: json.loads(v) for k, v in params.items() if k.startswith("option.")} == {
        f"option.{k}": v for k, v in json.loads(OPTIONS).items()}  # --options, visible in MLflow
    precision = {"fp32": "fp32", "fp16": "fp16", "ptq-int8": "int8", "qat-int8": "int8"}
    for v in versions:
        tags = v.tags
        assert tags["architecture"] == "stfpm"
        assert tags["precision"] == precision[tags["variant"]]
        assert tags["input_size"] == "64x64"
        assert tags["categories"] == "brick,coffee"
        assert 0.0 <= float(tags["image_auroc"]) <= 1.0
        assert np.isfinite(float(tags["threshold"]))
        assert client.get_model_version_by_alias("anomaly-detector", f"stfpm-{tags['variant']}").version \
            == v.version
    assert versions[2].tags["calibration"] == "real-minmax"
    assert versions[0].tags["calibration"] == "none"
    # The end table lists every registered version.
    rows = [line for line in built["stdout"].splitlines() if line.count("│") > 2 and "stfpm" in line]
    assert sorted(line.split("│")[2].strip() for line in rows) == sorted(VARIANTS * 2)


def test_build_keeps_artifacts_beside_the_embedded_store(built) -> None:
    store = built["root"] / "store"
    assert not (built["cwd"] / "mlruns").exists()
    assert list(built["cwd"].iterdir()) == []
    assert any((store / "mlartifacts").rglob("model.onnx"))
    with sqlite3.connect(store / "mlflow.db") as db:
        locations = [row[0] for row in db.execute("select artifact_location from experiments")]
    assert locations and all(loc.startswith((store / "mlartifacts").as_uri()) for loc in locations), locations


def test_fp32_version_carries_a_torch_model_that_reproduces_its_onnx(built, tmp_path: Path) -> None:
    import mlflow.artifacts

    from registry.checkpoint import CheckpointError, check_reproduces, load_checkpoint
    from registry.data.mvtec import load_test_split
    from service.repository.artifact import read_model_dir
    from service.runtime.engine import OnnxModel
    from service.runtime.imaging import decode_image

    client = _client(built["uri"])
    fp32 = client.get_model_version_by_alias("anomaly-detector", "stfpm-fp32")
    torch_dir = mlflow.artifacts.download_artifacts(run_id=fp32.run_id, artifact_path="torch",
                                                    dst_path=str(tmp_path), tracking_uri=built["uri"])
    model_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("anomaly-detector", fp32.version),
        dst_path=str(tmp_path / "model"), tracking_uri=built["uri"])
    import torch

    assert load_checkpoint(torch_dir).config.extra == json.loads(OPTIONS)  # --options reached the model
    engine = OnnxModel(*read_model_dir(Path(model_dir)))
    batch = np.stack([engine.prepare(decode_image(s.path.read_bytes()))
                      for s in load_test_split(built["data"])[:4]])
    scores_onnx, maps_onnx = engine.run(batch)
    with torch.no_grad():
        maps_torch, scores_torch = load_checkpoint(torch_dir)(torch.from_numpy(batch))
    np.testing.assert_allclose(maps_torch.numpy()[:, 0], maps_onnx, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores_torch.numpy(), scores_onnx, rtol=1e-3, atol=1e-3)
    # what `variants --from` checks before it builds anything: this checkpoint passes, and one
    # whose weights moved (as restoring with another default would move its maps) is refused
    images = [s.path.read_bytes() for s in load_test_split(built["data"])[:4]]
    model = load_checkpoint(torch_dir)
    check_reproduces(model, engine, images)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 4).mul_(1.05)
    with pytest.raises(CheckpointError, match="does not reproduce the registered ONNX"):
        check_reproduces(model, engine, images)


def test_variants_from_a_registered_fp32_version_in_a_fresh_process(built) -> None:
    proc = _anomaly(built["cwd"], "variants", "--from", "models:/anomaly-detector@stfpm-fp32", "--variants",
                    "qat-int8", "--qat-epochs", "1", "--tracking-uri", built["uri"],
                    "--work-dir", str(built["root"] / "work-later"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(built["uri"])
    latest = client.get_model_version_by_alias("anomaly-detector", "stfpm-qat-int8")
    assert str(latest.version) == "5"
    assert latest.tags["variant"] == "qat-int8" and latest.tags["precision"] == "int8"
    assert client.get_run(latest.run_id).data.params["parent_version"] == "1"
    assert 0.0 <= float(latest.tags["image_auroc"]) <= 1.0


@pytest.mark.parametrize(("args", "message"), [
    (("--from", "models:/anomaly-detector/2"), "fp16 version"),
    (("--from", "models:/no-such-model/1"), "not found"),
    (("--from", "anomaly-detector/1"), "is not models:/"),
    (("--from", "models:/anomaly-detector/1", "--variants", "int4"), "unknown variant"),
    (("--from", "models:/anomaly-detector/1", "--calibration", "real-magic"), "expected <real|random>"),
])
def test_variants_bad_requests_are_clear_errors(built, args: tuple[str, ...], message: str) -> None:
    proc = _anomaly(built["cwd"], "variants", *args, "--tracking-uri", built["uri"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


@pytest.mark.parametrize(("options", "message"), [
    ('{"techer": "distilled"}', "reads option(s) techer"),  # a typo never trains the default
    ('["teacher"]', "must be a JSON object"),
    ("{teacher: distilled}", "not JSON"),
    ('{"teacher": "random"}', "teacher must be one of"),
    ('{"teacher_stages": 0}', "teacher_stages must be at least 1"),
])
def test_build_refuses_bad_architecture_options(built, options: str, message: str) -> None:
    proc = _anomaly(built["cwd"], "build", "--data", str(built["data"]), "--arch", "us", "--epochs", "1",
                    "--input-size", "64", "--options", options, "--tracking-uri", built["uri"],
                    "--work-dir", str(built["root"] / "work-refused"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    versions = _client(built["uri"]).search_model_versions("name='anomaly-detector'")
    assert all(v.tags["architecture"] == "stfpm" for v in versions)  # nothing registered


def test_variants_from_refuses_a_checkpoint_that_does_not_reproduce_its_version(built) -> None:
    """A torch model logged with the FP32 version that no longer gives the registered ONNX
    file's maps (code whose defaults changed since it was saved) is refused before any
    variant is built: exit 2, a message that says why, and no new version."""
    import torch

    from registry.checkpoint import WEIGHTS_FILE

    client = _client(built["uri"])
    fp32 = client.get_model_version_by_alias("anomaly-detector", "stfpm-fp32")
    artifacts = built["root"] / "store" / "mlartifacts"
    [weights] = [p for p in artifacts.rglob(WEIGHTS_FILE) if fp32.run_id in str(p)]
    saved = weights.read_bytes()
    try:
        state = torch.load(weights, weights_only=True)
        name = next(k for k, v in state.items() if v.ndim == 4 and "student" in k)
        state[name] = state[name] * 1.05
        torch.save(state, weights)
        before = len(client.search_model_versions("name='anomaly-detector'"))
        proc = _anomaly(built["cwd"], "variants", "--from", "models:/anomaly-detector@stfpm-fp32",
                        "--variants", "ptq-int8", "--tracking-uri", built["uri"],
                        "--work-dir", str(built["root"] / "work-bad"))
    finally:
        weights.write_bytes(saved)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not reproduce the registered ONNX model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(client.search_model_versions("name='anomaly-detector'")) == before
