"""Rules of the wire contract that every side applies the same way: the server (all
transports), the HTTP gateway and the SDK, which checks before it sends.

Names shared by every side: the default registered model and server address, the files
treated as images, and the server-side timing keys of a score result (defined by the
proto's `Timings` message).

Identifiers (`request_id`, `station`) are recorded in the inspection log and written to log
lines, so they are bounded and printable: at most `MAX_ID_LENGTH` characters, no control
or other non-printable characters (`str.isprintable`).

Failures are classified once, here, for the SDK's retries and the hot folder alike
(`classify`): **permanent** (the request itself is wrong: invalid, too large,
unauthenticated, permission denied, not found; sending it again cannot help), **server
down** (unavailable, or cancelled by a server shutting down: everything waits, nothing is
the request's fault), and **transient** (overloaded, deadline exceeded, and anything the
server did not foresee: try this request again later, within a budget).
"""

from __future__ import annotations

DEFAULT_MODEL_NAME = "anomaly-detector"  # the registered model a server serves unless told otherwise
DEFAULT_TARGET = "127.0.0.1:50051"  # the server's default gRPC address
# The fields of the proto's `Timings`, in order (tests/contract/test_layers.py checks): spelled here so
# that this module needs no protobuf runtime (a peer environment may have another one).
TIMING_KEYS: tuple[str, ...] = ("decode_ms", "queue_ms", "inference_ms", "total_ms")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # files treated as images
MAX_ID_LENGTH = 128
ID_FIELDS = ("request_id", "station")


def identifier_problem(field: str, value: str) -> str | None:
    """Why `value` is not acceptable as the identifier `field`, or None when it is.

    Args:
        field: the field's name, used in the message (e.g. `request_id`).
        value: what the client sent ("" is fine: the server fills in a request id).
    """
    if len(value) > MAX_ID_LENGTH:
        return f"{field} is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed"
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return (f"{field} contains the non-printable character U+{ord(bad):04X} at position "
                f"{value.index(bad)}; use printable characters only")
    return None


PERMANENT = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED",
                       "NOT_FOUND", "UNIMPLEMENTED"})
SERVER_DOWN = frozenset({"UNAVAILABLE", "CANCELLED"})
PERMANENT_KIND, SERVER_DOWN_KIND, TRANSIENT_KIND = "permanent", "server down", "transient"


def too_large(code: str, message: str) -> bool:
    """Whether this is the answer to a message over gRPC's size limit (RESOURCE_EXHAUSTED, but permanent)."""
    return code == "RESOURCE_EXHAUSTED" and "larger than max" in message


def classify(code: str, message: str = "") -> str:
    """`permanent`, `server down` or `transient` for a gRPC status name and its message."""
    if code in PERMANENT or too_large(code, message):
        return PERMANENT_KIND
    if code in SERVER_DOWN:
        return SERVER_DOWN_KIND
    return TRANSIENT_KIND
