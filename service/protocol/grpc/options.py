"""gRPC channel and server options shared by the server and the gateway's channel to it.

Kept apart from `server` so that the gateway, which only forwards, imports neither ONNX
Runtime nor SQLAlchemy (tests/contract/test_layers.py checks `sys.modules` in a fresh interpreter).
"""

from __future__ import annotations

from anomaly.channel import MAX_MESSAGE
from service.settings import Settings


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options: message size limits follow the image byte limit."""
    limit = settings.max_image_bytes + 64 * 1024
    return [("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, MAX_MESSAGE))]


def gateway_options(settings: Settings) -> list[tuple[str, int]]:
    """The gateway's channel to the server: as the server's, but it accepts any answer a client
    of the server accepts (a part for review carries its image with its drawings, beyond the
    image limit: with the server's own receive limit, the gateway refused it)."""
    limit = settings.max_image_bytes + 64 * 1024
    return [("grpc.max_receive_message_length", max(limit, MAX_MESSAGE)),
            ("grpc.max_send_message_length", max(limit, MAX_MESSAGE))]
