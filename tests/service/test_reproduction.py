"""INT8 that holds on the CPU that serves it (issue 36).

- The portable INT8 scheme (`u8s8-rr`: 7-bit weights) computes integers that fit every x86
  kernel, and its scores stay near FP32's through the serving engine on this CPU; QAT trains
  on the same 7-bit grid it exports.
- Every version carries a reproduction record and `measured.*` tags; a server refuses a version
  whose recorded scores it does not reproduce (a record made elsewhere: here, a perturbed
  copy) with the reason, keeps the previous version serving, across a SIGKILL and restart,
  and writes the result back as `hardware.<host class>.status`.

Real servers on loopback, a real MLflow store, the session's trained models."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import torch
from conftest import Store, register_mutated, wait_for
from mlflow import MlflowClient
from onnx import numpy_helper

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import free_port, start_server
from registry.data.mvtec import load_test_split
from registry.variants.qat import WEIGHT_QRANGE, _WeightFakeQuant
from service.repository.reproduction import RECORD_FILE, check, find_record
from service.runtime.engine import OnnxModel
from service.runtime.hardware import Host, parse_cpuinfo, this_host

POLL = {"ANOMALY_POLL_INTERVAL_S": "0.3"}


@pytest.fixture(scope="module")
def client(store: Store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def _scores(model: OnnxModel, paths: list[Path]) -> np.ndarray:
    return np.array([float(model.infer(model.prepare_encoded(p.read_bytes())[None])[0][0]) for p in paths])


def test_host_classes_from_cpuinfo() -> None:
    """The host class names what changes INT8 kernels: VNNI or not, AVX-512 or AVX2, ARM dot
    product; read from /proc/cpuinfo text of each kind."""
    def host(text: str, machine: str) -> Host:
        name, flags = parse_cpuinfo(text)
        return Host(machine, name, tuple(f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                                     "asimddp", "i8mm") if f in flags), "1.0")

    epyc = host("model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n", "x86_64")
    assert epyc.cpu == "AMD EPYC 7B12" and epyc.isa_class == "x86_64-avx2"
    skx = host("model name: Xeon\nflags: avx2 avx512f avx512bw\n", "x86_64")
    assert skx.isa_class == "x86_64-avx512"
    clx = host("model name: Xeon\nflags: avx2 avx512f avx512bw avx512_vnni\n", "x86_64")
    assert clx.isa_class == "x86_64-avx512vnni"
    adl = host("model name: Core\nflags: avx2 avx_vnni\n", "x86_64")
    assert adl.isa_class == "x86_64-avxvnni"
    orin = host("processor: 0\nFeatures: fp asimd asimddp\nCPU part: 0xd42\n", "aarch64")
    assert orin.isa_class == "aarch64-dotprod"
    assert orin.host_class("TensorrtExecutionProvider") == "aarch64-dotprod-tensorrt"
    here = this_host()
    assert here.tags()["measured.host_class"] == here.isa_class and here.ort


def test_portable_int8_weights_fit_every_kernel_and_qat_trains_on_that_grid(store, variant_builds) -> None:
    """Every PTQ and QAT INT8 graph of every architecture holds weights in [-64, 64] (7 bits,
    so u8 × s8 pairs never saturate `vpmaddubsw`'s 16-bit sums: 2 × 255 × 64 = 32640), and
    QAT's fake quantization rounds a weight onto exactly the integers ONNX Runtime exports."""
    for arch, builds in variant_builds.items():
        for b in builds:
            if b.variant not in ("ptq-int8", "qat-int8"):
                continue
            graph = onnx.load(str(b.onnx_path)).graph
            weights = [numpy_helper.to_array(i) for i in graph.initializer
                       if i.data_type == onnx.TensorProto.INT8]
            assert weights, f"{arch} {b.variant}: no int8 weights"
            worst = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
            assert worst <= 64, f"{arch} {b.variant}: an int8 weight of magnitude {worst} (not portable)"
    w = torch.randn(8, 3, 3, 3)
    fq = _WeightFakeQuant(0, WEIGHT_QRANGE["u8s8-rr"])(w)
    scale = w.abs().amax(dim=(1, 2, 3)) / 64
    integers = fq / scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(integers, integers.round(), atol=1e-4) and integers.abs().max() <= 64 + 1e-4


def test_int8_scores_stay_near_fp32_through_the_serving_engine(store, other_architectures, variant_builds,
                                                               sample_root: Path) -> None:
    """On the CPU running the test, each architecture's PTQ-INT8 and QAT-INT8 rank the test
    images as its FP32 parent does (Spearman ρ ≥ 0.9) and decide them alike at the parent's
    operating point (≥ 90 % the same decision when the INT8 version flags the same share of
    images as the parent's threshold does). Each version's own threshold is set from its own
    validation scores; on the test session's tiny models a few borderline images then move
    between runs (a CI run saw 75 % at ρ 0.991), which says nothing about INT8."""
    from scipy.stats import spearmanr

    fp32 = {"stfpm": store.build, **other_architectures}
    paths = [s.path for s in load_test_split(sample_root)]
    host = this_host().describe()
    for arch, builds in variant_builds.items():
        parent = fp32[arch]
        base = _scores(OnnxModel(parent.onnx_path, parent.metadata), paths)
        base_ng = base >= parent.metadata.image_stats[""].threshold
        for b in builds:
            if b.variant not in ("ptq-int8", "qat-int8"):
                continue
            int8 = _scores(OnnxModel(b.onnx_path, b.metadata), paths)
            assert np.isfinite(int8).all()
            rho = spearmanr(base, int8).statistic
            # The INT8 version flagging as many images as the parent does: its top-k scores.
            k = int(base_ng.sum())
            at_parent_rate = np.sort(int8)[-k] if k else np.inf
            same = float(np.mean((int8 >= at_parent_rate) == base_ng))
            print(f"{arch} {b.variant}: Spearman {rho:.3f}, same decision {same:.2f} ({host})")
            assert rho >= 0.9 and same >= 0.9, f"{arch} {b.variant} on {host}: ρ {rho:.3f}, same {same:.2f}"


def test_every_version_names_where_it_was_measured(store, client) -> None:
    """Tags and description of a built version name the CPU, its ISA flags, ONNX Runtime's
    version and the provider; its artifact carries the reproduction record."""
    mv = client.get_model_version(store.model_name, store.version)
    here = this_host()
    assert mv.tags["measured.cpu"] == here.cpu and mv.tags["measured.ort"] == here.ort
    assert mv.tags["measured.isa"] == (",".join(here.features) or "none")
    assert mv.tags["measured.provider"] == "CPUExecutionProvider"
    assert mv.tags["measured.host_class"] == here.isa_class
    assert int(mv.tags["measured.reproduction"]) >= 4
    assert f"Measured on {here.cpu}" in mv.description and "ONNX Runtime" in mv.description
    folder = Path(store.build.onnx_path).parent / "reproduction"
    body = json.loads((folder / RECORD_FILE).read_text())
    assert len(body["items"]) >= 4 and body["measured"]["measured.host_class"] == here.isa_class


def test_check_refuses_a_record_it_cannot_trust(store, tmp_path: Path) -> None:
    """The check itself: the record as built reproduces; scores perturbed by 30 % do not (with
    the numbers in the reason); a record naming a file outside the artifact, or none at all,
    is refused; a version with no record is `unrecorded` (served with a warning)."""
    import shutil

    b = store.build
    model = OnnxModel(b.onnx_path, b.metadata)
    built = Path(b.onnx_path).parent / "reproduction"
    assert find_record(built) is not None
    ok = check(model, built, 0.01, 0)
    assert ok.status == "reproduced" and ok.checked >= 4 and ok.worst < 1e-3, ok.detail

    def variant(edit) -> Path:  # noqa: ANN001
        folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(built, folder)
        body = json.loads((folder / RECORD_FILE).read_text())
        edit(body)
        (folder / RECORD_FILE).write_text(json.dumps(body))
        return folder

    def scaled(body: dict) -> None:
        for item in body["items"]:
            item["score"] *= 1.3

    bad = check(model, variant(scaled), 0.01, 0)
    assert bad.status == "refused" and bad.worst > 0.05 and "worst relative error" in bad.detail
    outside = check(model, variant(lambda body: body["items"][0].update(file="../../../etc/passwd")), 0.01, 0)
    assert outside.status == "refused" and "not in the artifact" in outside.detail
    empty = check(model, variant(lambda body: body.update(items=[])), 0.01, 0)
    assert empty.status == "refused"
    (tmp_path / "none").mkdir()
    assert check(model, tmp_path / "none", 0.01, 0).status == "unrecorded"

    # A part recorded exactly on its threshold (an F1-optimal threshold is one part's score)
    # that comes out a rounding error below it here is not a flipped decision; one recorded
    # clearly above the threshold and scored below it here is.
    body = json.loads((built / RECORD_FILE).read_text())
    first = body["items"][0]
    here = first["score"]
    stats = {k: v.model_copy(update={"threshold": here * (1 + 1e-7)})
             for k, v in b.metadata.image_stats.items()}
    edge = OnnxModel(b.onnx_path, b.metadata.model_copy(update={"image_stats": stats}))
    on_it = check(edge, variant(lambda body: body["items"][0].update(score=here * (1 + 1e-7))), 0.01, 0)
    assert on_it.status == "reproduced" and on_it.flipped == 0, on_it.detail
    above = check(edge, variant(lambda body: body["items"][0].update(score=here * 1.005)), 0.01, 0)
    assert above.flipped == 1 and above.status == "refused", above.detail
    # A large tolerance does not widen what counts as "on the threshold".
    far = check(edge, variant(lambda body: body["items"][0].update(score=here * 1.005)), 0.5, 0)
    assert far.flipped == 1 and far.status == "refused", far.detail


def test_check_survives_hostile_records_and_knows_when_one_is_missing(store, tmp_path: Path) -> None:
    """Records crafted to break the check are refusals with a bounded reason, never an
    exception; a record missing from an artifact whose tags say it had one is refused, as is an
    INT8 version measured on another host class with none; an override naming this host class
    with who and why lets a refused version serve, flagged `overridden`."""
    import shutil

    from service.repository.reproduction import (
        OVERRIDE_BY_TAG,
        OVERRIDE_REASON_TAG,
        OVERRIDE_TAG,
        RECORDED_TAG,
        spread,
    )

    b = store.build
    model = OnnxModel(b.onnx_path, b.metadata)
    built = Path(b.onnx_path).parent / "reproduction"
    here = this_host().isa_class

    def variant(text: str | None = None, edit=None) -> Path:  # noqa: ANN001
        folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(built, folder)
        if edit is not None:
            body = json.loads((folder / RECORD_FILE).read_text())
            edit(body)
            text = json.dumps(body)
        if text is not None:
            (folder / RECORD_FILE).write_text(text)
        return folder

    nested = check(model, variant("[" * 100_000 + "]" * 100_000), 0.01, 0)
    assert nested.status == "refused" and len(nested.detail) < 1000
    huge_int = check(model, variant(edit=lambda body: body["items"][0].update(score=int("9" * 400))), 0.01, 0)
    assert huge_int.status == "refused"
    twice = check(model, variant(edit=lambda body: body["items"].append(dict(body["items"][0]))), 0.01, 0)
    assert twice.status == "refused" and "twice" in twice.detail
    long_name = {"measured.cpu": "x" * 300_000}
    long_cpu = check(model, variant(edit=lambda body: body["measured"].update(long_name)), 0.01, 0)
    assert long_cpu.status == "reproduced" and len(long_cpu.detail) < 2000

    (tmp_path / "stripped").mkdir()
    missing = check(model, tmp_path / "stripped", 0.01, 0, {RECORDED_TAG: "24"})
    assert missing.status == "refused" and "holds no" in missing.detail
    int8 = OnnxModel(b.onnx_path, b.metadata.model_copy(update={"precision": "int8"}))
    elsewhere = check(int8, tmp_path / "stripped", 0.01, 0, {"measured.host_class": "x86_64-somewhere-else"})
    assert elsewhere.status == "refused" and "cannot be checked" in elsewhere.detail
    assert check(int8, tmp_path / "stripped", 0.01, 0, {"measured.host_class": here}).status == "unrecorded"

    def scaled(body: dict) -> None:
        for item in body["items"]:
            item["score"] *= 1.3

    refused = variant(edit=scaled)
    half = {OVERRIDE_TAG: f"x86_64-other, {here}", OVERRIDE_BY_TAG: "j.doe"}
    assert check(model, refused, 0.01, 0, half).status == "refused"  # no reason: not an override
    whole = {**half, OVERRIDE_REASON_TAG: "line 3 runs on this PC until the rebuild"}
    overridden = check(model, refused, 0.01, 0, whole)
    assert overridden.status == "overridden" and overridden.allows and "j.doe" in overridden.detail
    other = {**whole, OVERRIDE_TAG: "x86_64-other"}
    assert check(model, refused, 0.01, 0, other).status == "refused"

    parts = [(Path(f"{c}-{e}-{i}.png"), c, e)
             for c in "abcdefghijklmno" for e in ("OK", "NG") for i in range(3)]
    kept = spread(parts, 64)
    assert len(kept) == 64 and {(c, e) for _, c, e in kept} == {(c, e) for _, c, e in parts}


def _perturbed(folder: Path) -> None:
    """A record as another host would have made it: every recorded score 30 % higher."""
    path = find_record(folder)
    assert path is not None, "the session model's artifact has no reproduction record"
    body = json.loads(path.read_text())
    for item in body["items"]:
        item["score"] *= 1.3
        item["map_max"] *= 1.3
    body["measured"]["measured.host_class"] = "x86_64-avx2"
    path.write_text(json.dumps(body))


def version_answering(target: str, image: bytes) -> str:
    """The version that answers a brick part on the server at `target`."""
    with grpc.insecure_channel(target) as ch:
        answer = pb_grpc.AnomalyDetectionStub(ch).Score(pb.ScoreRequest(encoded=image, category="brick"),
                                                        timeout=30)
    return answer.model.version


@pytest.mark.timeout(600)
def test_a_version_that_does_not_reproduce_here_never_serves(store, client, good_and_defect,
                                                            tmp_path: Path) -> None:
    """The alias moves to a version whose recorded scores this host does not reproduce: it is
    refused on load (GetModel.last_error with the numbers, metric, hardware tag), the previous
    version keeps serving; SIGKILLed and started again, the server still serves the previous
    version and says why; a request naming the version is refused too."""
    name, alias, good = store.model_name, "repro-canary", store.version
    client.set_registered_model_alias(name, alias, good)
    bad = register_mutated(store, client, _perturbed, tmp_path)
    cache, metrics = tmp_path / "cache", free_port()
    env = {**POLL, "ANOMALY_METRICS_PORT": str(metrics)}
    host_class = this_host().isa_class
    status_tag = f"hardware.{host_class}.status"
    image = good_and_defect[1][0].read_bytes()
    server, target = start_server(store.tracking_uri, tmp_path / "server-1.log", cache_dir=cache,
                                  alias=alias, env=env)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            assert stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10).ref.version == good
            assert client.get_model_version(name, good).tags[status_tag] == "reproduced"
            client.set_registered_model_alias(name, alias, bad)
            now = wait_for(lambda: (i := stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10))
                           .last_error_version == bad and i, what="the reproduction refusal")
            assert "does not reproduce its registered scores on this host" in now.last_error
            assert "decision(s) flipped" in now.last_error and host_class in now.last_error
            assert now.ref.version == good and now.state == "SERVING"
            answer = stub.Score(pb.ScoreRequest(encoded=image, category="brick"), timeout=30)
            assert answer.model.version == good
            with pytest.raises(grpc.RpcError) as asked:
                stub.Score(pb.ScoreRequest(encoded=image, category="brick", version=int(bad)), timeout=30)
            assert "does not reproduce" in (asked.value.details() or "")
            text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
            refused = re.search(r'anomaly_reproduction_checks_total{name="[^"]+",result="refused"} (\S+)',
                                text)
            assert refused and float(refused.group(1)) >= 1
        tags = client.get_model_version(name, bad).tags
        assert tags[status_tag] == "refused" and "flipped" in tags[f"hardware.{host_class}.detail"]

        server.signal(signal.SIGKILL)
        assert server.proc is not None
        server.proc.wait(30)
        server, target = start_server(store.tracking_uri, tmp_path / "server-2.log", cache_dir=cache,
                                      alias=alias, env=env)
        assert version_answering(target, image) == good
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            now = stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10)
            assert now.ref.version == good and now.last_error_version == bad
            assert "does not reproduce" in now.last_error
        log = (tmp_path / "server-2.log").read_text()
        assert "ERROR" in log and "does not reproduce its registered scores" in log
        server.stop()

        # The operator overrides the check for this host class, naming who and why: after a
        # restart the version serves, flagged.
        for key, value in (("hardware.override", host_class), ("hardware.override.by", "j.doe"),
                           ("hardware.override.reason", "test: record made on another PC")):
            client.set_model_version_tag(name, bad, key, value)
        server, target = start_server(store.tracking_uri, tmp_path / "server-3.log", cache_dir=cache,
                                      alias=alias, env=env)
        assert version_answering(target, image) == bad
        assert wait_for(lambda: client.get_model_version(name, bad).tags[status_tag] == "overridden",
                        what="the overridden status tag")
        assert "WARNING" in (tmp_path / "server-3.log").read_text()
    finally:
        server.stop()
        client.set_registered_model_alias(name, alias, good)


def test_the_champion_rule_skips_a_build_that_does_not_reproduce_here(store, other_architectures,
                                                                      tmp_path: Path) -> None:
    """The demo's champion rule considers only builds whose recorded scores hold on this host:
    the most accurate and fastest build loses when its record says otherwise."""
    import shutil
    from dataclasses import replace

    from studies.demo import choose_champion, reproduces_here

    def as_if(build, auroc: float, p50: float, folder: Path | None = None):  # noqa: ANN001, ANN202
        report = replace(build.report, metrics={**build.report.metrics, "image_auroc": auroc},
                         latency_ms_p50=p50)
        if folder is not None:
            shutil.copytree(Path(build.onnx_path).parent, folder)
            _perturbed(folder / "reproduction")
            return replace(build, report=report, onnx_path=folder / Path(build.onnx_path).name)
        return replace(build, report=report)

    elsewhere = as_if(store.build, 0.99, 0.01, tmp_path / "recorded-elsewhere")
    assert not reproduces_here(elsewhere)
    rd = as_if(other_architectures["rd"], 0.985, 5.0)
    assert reproduces_here(rd)
    assert choose_champion([elsewhere, rd]) is rd
    with pytest.raises(RuntimeError, match="no build reproduces"):
        choose_champion([elsewhere])
