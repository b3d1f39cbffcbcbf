"""Rules of the wire contract that every side applies the same way: the server (all
transports), the HTTP gateway and the SDK, which checks before it sends.

Identifiers (`request_id`, `station`) are recorded in the inspection log and written to log
lines, so they are bounded and printable: at most `MAX_ID_LENGTH` characters, no control
or other non-printable characters (`str.isprintable`).
"""

from __future__ import annotations

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
