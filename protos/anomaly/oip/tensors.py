"""Tensors of the Open Inference Protocol (V2): datatypes, the raw little-endian byte form
(`raw_input_contents` / `raw_output_contents` over gRPC, the binary-data extension over
HTTP) and the typed `contents` / JSON form. Used alike by the server, the HTTP gateway and
the load tests.

A BYTES tensor's raw form is each element as a 4-byte little-endian length followed by its
bytes; every other datatype is the array's bytes in row-major order, little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The `InferTensorContents` field that carries each datatype in typed form.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the protocol's shapes and sizes are int64


class TensorError(ValueError):
    """A tensor whose data does not match its datatype and shape (the message says how)."""


def element_count(shape: Sequence[int]) -> int:
    """How many elements `shape` holds, worked out in Python integers (no int64 wrap-around:
    `[2**32, 2**32]` is not 0).

    Raises:
        TensorError: a negative dimension, or more elements than int64 counts.
    """
    if any(d < 0 for d in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= int(d)
        if count > INT64_MAX:
            raise TensorError(f"shape {list(shape)} holds more than {INT64_MAX} elements (int64)")
    return count


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements → their raw form (each one length-prefixed)."""
    return b"".join(struct.pack("<I", len(item)) + bytes(item) for item in items)


def _byte_spans(raw: bytes) -> Iterator[tuple[int, int]]:
    """Where each element of a BYTES tensor's raw form lies: (start, end) offsets.

    Raises:
        TensorError: the data is cut short.
    """
    at, index = 0, 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"BYTES data cut short: {len(raw) - at} byte(s) where a 4-byte length goes")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise TensorError(
                f"BYTES element {index} says {length} bytes but only {len(raw) - at - 4} follow"
            )
        yield at + 4, at + 4 + length
        at, index = at + 4 + length, index + 1


def bytes_count(raw: bytes) -> int:
    """How many elements the raw form of a BYTES tensor holds (nothing is copied).

    Raises:
        TensorError: the data is cut short.
    """
    return sum(1 for _ in _byte_spans(raw))


def deserialize_bytes(raw: bytes, count: int) -> list[bytes]:
    """The raw form of a BYTES tensor of `count` elements → the elements.

    Raises:
        TensorError: the data is cut short, or holds more or fewer elements than `count`.
    """
    view = memoryview(raw)
    items = [bytes(view[start:end]) for start, end in _byte_spans(raw)]
    if len(items) != count:
        raise TensorError(f"BYTES data holds {len(items)} element(s); the shape says {count}")
    return items


def from_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A non-BYTES tensor's raw form → an array of `shape`.

    Raises:
        TensorError: unknown datatype, or a byte count that does not match the shape.
    """
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"datatype {datatype!r} has no raw numeric form")
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """An array → the raw form of `datatype`."""
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
