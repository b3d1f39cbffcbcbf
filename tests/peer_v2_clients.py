"""Not a test module: run by tests/clients/test_oip_clients.py with the peers environment's Python
(`.venv-peers`: tritonclient and KServe, which pin protobuf 6). Drives this project's server
(gRPC) and gateway (REST) with those projects' own Open Inference Protocol clients and
prints one JSON object of what each client got back.

Usage: peer_v2_clients.py triton|kserve GRPC_TARGET HTTP_BASE MODEL SPARE_MODEL CATEGORY IMAGE...
(one process per project: both generate protobuf package `inference` into one descriptor pool)
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np

OUTPUTS = ("score", "normalized_score", "threshold", "is_anomalous")


def triton(module, url: str, model: str, spare: str, category: str, images: list[bytes]) -> dict:  # noqa: ANN001
    """Triton's client (gRPC or HTTP): health, metadata, a batch, load/unload, a refused unload."""
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(url=url)
    out: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    meta = client.get_model_metadata(model)
    meta = (
        meta
        if isinstance(meta, dict)
        else {"versions": list(meta.versions), "inputs": [{"name": i.name} for i in meta.inputs]}
    )
    out["versions"], out["inputs"] = meta["versions"], [i["name"] for i in meta["inputs"]]
    image = module.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer(model, [image], request_id="triton-1", parameters={"category": category})
    out["result"] = {name: result.as_numpy(name).tolist() for name in OUTPUTS}
    client.load_model(spare)
    out["spare_ready_after_load"] = client.is_model_ready(spare)
    client.unload_model(spare)
    out["spare_ready_after_unload"] = client.is_model_ready(spare)
    try:
        client.unload_model(model)
        out["watched_unload"] = "accepted"
    except InferenceServerException as exc:
        out["watched_unload"] = exc.message()
    client.close()
    return out


async def kserve_clients(target: str, base: str, model: str, category: str, images: list[bytes]) -> dict:
    """KServe's InferenceGRPCClient (binary tensors) and InferenceRESTClient (JSON, base64)."""
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    def outputs(response) -> dict:  # noqa: ANN001
        return {o.name: o.as_numpy().tolist() for o in response.outputs if o.name in OUTPUTS}

    out: dict = {}
    tensor = InferInput(name="image", shape=[len(images)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    request = InferRequest(
        model_name=model, infer_inputs=[tensor], request_id="kserve-grpc", parameters={"category": category}
    )
    async with InferenceGRPCClient(url=target, timeout=60) as client:
        out["grpc_ready"] = await client.is_server_ready()
        out["grpc"] = outputs(await client.infer(request))
    text = InferInput(
        name="image",
        shape=[len(images)],
        datatype="BYTES",
        data=[base64.b64encode(i).decode() for i in images],
    )
    request = InferRequest(
        model_name=model, infer_inputs=[text], request_id="kserve-rest", parameters={"category": category}
    )
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
        out["rest_ready"] = await client.is_server_ready(base)
        out["rest"] = outputs(await client.infer(base, request, model_name=model))
    return out


def main(argv: list[str]) -> None:
    which, target, base, model, spare, category, *paths = argv
    images = [open(p, "rb").read() for p in paths]  # noqa: SIM115
    if which == "triton":
        import tritonclient.grpc
        import tritonclient.http

        report = {
            "triton_grpc": triton(tritonclient.grpc, target, model, spare, category, images),
            "triton_http": triton(
                tritonclient.http, base.removeprefix("http://"), model, spare, category, images
            ),
        }
    else:
        report = {"kserve": asyncio.run(kserve_clients(target, base, model, category, images))}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
