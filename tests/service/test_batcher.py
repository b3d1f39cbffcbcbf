"""The batcher in-process, on the session's real ONNX model: deadlines, the queue bound and
cancellation, batching off (one pool call per request) and on (micro-batches)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest

from service.dataplane.batcher import Batcher, DeadlineExceeded
from service.errors import Overloaded
from service.repository.model_repository import ModelRepository, ModelSpec
from service.settings import Settings


@pytest.fixture(scope="module")
def model(store, tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(tracking_uri=store.tracking_uri, cache_dir=tmp_path_factory.mktemp("cache"))
    return ModelRepository(settings).get(ModelSpec(store.model_name, "champion")).model


def _x(model, value: float = 0.5) -> np.ndarray:  # noqa: ANN001
    h, w = model.metadata.input_size
    return np.full((3, h, w), value, np.float32)


def _batcher(model, executor: ThreadPoolExecutor, **kw: int) -> Batcher:  # noqa: ANN001
    async def run(fn, *args):  # noqa: ANN001, ANN202
        return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))

    return Batcher(model, run, max_delay_s=0.01, **{"max_batch": 1, "max_queue": 2, "workers": 1, **kw})


def test_unbatched_bound_deadline_and_cancellation(model) -> None:  # noqa: ANN001
    gate = threading.Event()

    def slow_prepare() -> tuple:
        gate.wait(10)
        return (_x(model), "extra")

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool)
            running = asyncio.create_task(b.submit_unbatched(slow_prepare))  # holds the only thread
            await asyncio.sleep(0.05)
            waiting = [asyncio.create_task(b.submit_unbatched(lambda i=i: (_x(model), i))) for i in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="queue full"):  # 2 waiting = max_queue
                await b.submit_unbatched(lambda: (_x(model),))
            waiting[1].cancel()  # a client gone while waiting frees its place
            await asyncio.sleep(0.05)
            assert b._waiting == 1
            late = asyncio.create_task(b.submit_unbatched(lambda: (_x(model),), time.monotonic() + 0.05))
            await asyncio.sleep(0.2)
            gate.set()
            result, extra = await running
            assert extra == ("extra",) and np.isfinite(result.score) and result.batch_size == 1
            assert (await waiting[0])[1] == (0,)
            with pytest.raises(DeadlineExceeded, match="deadline passed after"):
                await late
            assert b.idle and b._waiting == 0
            ok, _ = await b.submit_unbatched(lambda: (_x(model),))  # and it still serves
            assert np.isfinite(ok.score)
            await b.close(1)

    asyncio.run(main())


def test_batched_requests_share_one_run_and_honour_deadlines(model) -> None:  # noqa: ANN001
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            b = _batcher(model, pool, max_batch=4, max_queue=8)
            results = await asyncio.gather(*(b.submit(_x(model, v)) for v in (0.1, 0.5, 0.9)))
            assert {r.batch_size for r in results} == {3}
            alone = [(await b.submit(_x(model, v))).score for v in (0.1, 0.5, 0.9)]
            np.testing.assert_allclose([r.score for r in results], alone, rtol=1e-4, atol=1e-5)
            with pytest.raises(DeadlineExceeded):
                await b.submit(_x(model), time.monotonic() - 1)
            await b.close(1)

    asyncio.run(main())

