"""One way in: the HTTP routes reach the server through a backend, a gRPC connection (the
gateway process) or the server's own handlers (in-process HTTP), and both turn the same
failure into the same HTTP answer, from the one table `forwarding.GRPC_TO_HTTP`.

A real gRPC server on a loopback port answers through `service.errors.answering`; the same
handlers are called in-process by `PlaneBackend`, with no gRPC call emulated."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from service import errors
from service.keys import parse_entry
from service.protocol.grpc.admission import Admission
from service.protocol.grpc.security import ApiKeyInterceptor
from service.protocol.grpc.server import SERVICE_NAME
from service.protocol.inprocess import PlaneBackend
from service.protocol.rest.forwarding import GRPC_TO_HTTP, GrpcBackend, Problem
from service.settings import Settings


class Handlers(pb_grpc.AnomalyDetectionServicer):
    """GetModel fails as told; ListModels answers after `delay` seconds."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.delay = 0.0
        self.senders: list[str] = []

    @errors.answering
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        assert self.failure is not None
        raise self.failure

    @errors.answering
    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self.senders.append(dict(context.invocation_metadata()).get("x-api-key", ""))
        await asyncio.sleep(self.delay)
        return pb.ListModelsResponse()


FAILURES = [errors.InvalidInput("bad image"), errors.ModelNotFound("no model 'x'"),
            errors.Overloaded("queue full"), errors.NotReady("loading"), errors.ModelLoadError("broken"),
            errors.NonFiniteOutput("NaN score"), errors.DeadlineExceeded("late"), errors.Refused("watched"),
            RuntimeError("secret text of an unforeseen failure"),
            TimeoutError("a handler's own timeout, not the call's deadline")]


async def _answers(handlers: Handlers, backends: dict[str, object], method: str, message: object,
                   timeout: float = 5.0, metadata: tuple = ()) -> dict[str, tuple]:
    """Each backend's answer to one call: ("ok", response) or the Problem's fields."""
    out = {}
    for name, backend in backends.items():
        try:
            out[name] = ("ok", await backend.call(method, message, timeout, metadata))
        except Problem as exc:
            detail = exc.detail.split("request_id=")[0]  # an internal error's reference differs per call
            out[name] = (exc.status, exc.title, exc.grpc_code, detail)
    return out


def test_both_backends_map_each_failure_once_from_the_one_table() -> None:
    async def run() -> None:
        handlers = Handlers()
        server = grpc.aio.server()
        pb_grpc.add_AnomalyDetectionServicer_to_server(handlers, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        backends = {"grpc": GrpcBackend([pb_grpc.AnomalyDetectionStub(channel)]),
                    "in-process": PlaneBackend(SERVICE_NAME, handlers)}
        try:
            for failure in FAILURES:
                handlers.failure = failure
                answers = await _answers(handlers, backends, "GetModel", pb.GetModelRequest(model="x"))
                assert answers["grpc"] == answers["in-process"], failure
                status, _, code, detail = answers["in-process"]
                expected = getattr(failure, "code", grpc.StatusCode.INTERNAL)
                assert (status, code) == (GRPC_TO_HTTP.get(expected, 500), expected.name)
                assert "secret" not in detail  # an unforeseen failure answers a log reference only
            handlers.delay = 1.0  # past the call's deadline: 504 on both ways
            answers = await _answers(handlers, backends, "ListModels", pb.ListModelsRequest(), timeout=0.2)
            assert answers["grpc"][:3] == answers["in-process"][:3] == (504, "Deadline Exceeded",
                                                                      "DEADLINE_EXCEEDED")
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(run())


def test_in_process_calls_are_checked_as_grpc_calls_are() -> None:
    """Keys and roles first (a refused call takes no slot), then the concurrent-call limit."""

    async def run() -> None:
        handlers = Handlers()
        keys = ApiKeyInterceptor([parse_entry("score:line:k-score")])
        admission = Admission(Settings(max_concurrent_rpcs=1))
        backend = PlaneBackend(SERVICE_NAME, handlers, keys, admission)
        with pytest.raises(Problem) as denied:
            await backend.call("ListModels", pb.ListModelsRequest(), 5.0, ())
        assert (denied.value.status, denied.value.grpc_code) == (401, "UNAUTHENTICATED")
        with pytest.raises(Problem) as role:
            await backend.call("Feedback", pb.FeedbackRequest(), 5.0, (("x-api-key", "k-score"),))
        assert role.value.status == 403 and "needs the role operate" in role.value.detail
        handlers.delay = 0.5
        first = asyncio.create_task(backend.call("ListModels", pb.ListModelsRequest(), 5.0,
                                                 (("x-api-key", "k-score"),)))
        await asyncio.sleep(0.1)
        with pytest.raises(Problem) as full:
            await backend.call("ListModels", pb.ListModelsRequest(), 5.0,
                               (("authorization", "Bearer k-score"),))
        assert (full.value.status, full.value.grpc_code) == (429, "RESOURCE_EXHAUSTED")
        await first
        handlers.delay = 0.0
        # the slot was given back
        await backend.call("ListModels", pb.ListModelsRequest(), 5.0, (("x-api-key", "k-score"),))
        assert handlers.senders == ["k-score", "k-score"]

    asyncio.run(run())
