"""The serve path imports no torch: `import service` and a running server, checked in a
fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SNIPPET = textwrap.dedent("""
    import asyncio, sys
    import service, service.runtime.engine, service.protocol.rest.gateway, service.protocol.grpc.server
    import cli.serve, cli.main
    import edge_anomaly_client.sdk, cli.client
    assert "torch" not in sys.modules, "importing the service pulled torch"

    from service.protocol.grpc.server import GrpcServer
    from service.settings import Settings
    from edge_anomaly_client.sdk import AsyncAnomalyClient

    async def main():
        settings = Settings(tracking_uri=sys.argv[1], grpc_port=0, cache_dir=sys.argv[2])
        server = GrpcServer(settings)
        port = await server.start()
        async with AsyncAnomalyClient(f"127.0.0.1:{port}") as client:
            result = await client.score(open(sys.argv[3], "rb").read())
        await server.stop(0)
        return result

    result = asyncio.run(main())
    assert result.model.version
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("TORCH_MODULES", loaded)
""")


def test_service_imports_and_serves_without_torch(store, good_and_defect, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, store.tracking_uri, str(tmp_path / "cache"),
         str(good_and_defect[0][0])],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TORCH_MODULES []" in proc.stdout
