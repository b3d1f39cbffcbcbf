"""The HTTP gateway's JSON form of the `anomaly.v1` messages, in one place.

The gateway answers with `to_json(message)` and the SDK reads an answer back into the
same proto message with `from_json`, so a result is mapped to the SDK's types once,
whichever transport carried it. The JSON is protobuf's canonical mapping with the proto's
own field names and every field present, except that a `bytes` field `x` travels as
`x_base64` (null when empty), which says what the string holds.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _rename_bytes(data: Any, descriptor: Descriptor, outgoing: bool) -> Any:
    """Rename the bytes fields of `data` (a dict for the message `descriptor` describes,
    recursively) to or from their `_base64` names."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for f in descriptor.fields:
        if f.type == _BYTES:
            if outgoing:
                out[f"{f.name}_base64"] = out.pop(f.name, None) or None
            elif out.get(f"{f.name}_base64") is not None:
                out[f.name] = out.pop(f"{f.name}_base64")
            else:
                out.pop(f"{f.name}_base64", None)
        elif f.type == _MESSAGE and f.name in out and not f.message_type.GetOptions().map_entry:
            value = out[f.name]
            out[f.name] = ([_rename_bytes(v, f.message_type, outgoing) for v in value]
                           if isinstance(value, list) else _rename_bytes(value, f.message_type, outgoing))
    return out


def to_json(message: Message) -> dict[str, Any]:
    """A proto message → the gateway's JSON object."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _rename_bytes(data, message.DESCRIPTOR, outgoing=True)


def from_json(data: dict[str, Any], message_type: type[M]) -> M:
    """The gateway's JSON object → a `message_type` message (unknown fields are ignored, so
    an older SDK reads a newer gateway).

    Raises:
        google.protobuf.json_format.ParseError: `data` does not fit the message.
    """
    return json_format.ParseDict(_rename_bytes(data, message_type.DESCRIPTOR, outgoing=False), message_type(),
                                 ignore_unknown_fields=True)
