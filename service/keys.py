"""API keys with roles: the entries of `ANOMALY_API_KEYS` and `ANOMALY_API_KEYS_FILE`.

A key carries a **role**, and roles are ordered, each allowing what the one before allows:

- `score`: scoring (`Score`, `ScoreStream`, V2 `ModelInfer`) and model metadata
  (`ListModels`, `GetModel`, V2 server / model metadata and readiness);
- `operate`: also operator feedback (`Feedback`, `POST /v1/feedback`);
- `admin`: also model control (V2 repository load / unload / index) and statistics.

Each entry is one of:

- `role:name:secret`, e.g. `admin:ops-laptop:7c1f…` (the secret may contain `:`);
- a JSON object `{"key": "…", "role": "operate", "name": "review-station"}` (a JSON list
  item in `ANOMALY_API_KEYS`, or one line of the file; the settings keep it as its JSON
  text, so every entry stays one secret string);
- a bare `secret`, as before roles existed: it keeps working with the **`score`** role (a
  key never gets more than scoring unless its entry says so; the server logs at start-up
  which keys got `score` this way). A bare key that happens to begin with `score:`,
  `operate:` or `admin:` followed by a second `:` reads as the first form.

The name (letters, digits, `.`, `_`, `@`, `-`; at most 64) is what the logs and the
feedback rows show of the key; a key given without one is named `key-<first 8 hex digits
of its SHA-256>`. The secret itself is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator, model_validator

Role = Literal["score", "operate", "admin"]
ROLES: tuple[Role, ...] = ("score", "operate", "admin")  # each allows what the ones before it allow
DEFAULT_ROLE: Role = "score"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def allows(granted: Role, needed: Role) -> bool:
    """Whether a key of role `granted` may make a call that needs `needed`."""
    return ROLES.index(granted) >= ROLES.index(needed)


def default_name(secret: str) -> str:
    """The name of a key given without one: `key-` and 8 hex digits of its SHA-256."""
    return f"key-{hashlib.sha256(secret.encode()).hexdigest()[:8]}"


class ApiKey(BaseModel):
    """One API key the server accepts: the secret, its role and the name it is known by.

    `role` is None when the entry named none (a bare key): such a key is a `score` key
    (`granted`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SecretStr
    role: Role | None = None
    name: str = ""

    @field_validator("key")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret or secret != secret.strip() or any(not c.isprintable() for c in secret):
            raise ValueError("an API key must be non-empty printable text without surrounding spaces")
        return value

    @model_validator(mode="after")
    def _named(self) -> ApiKey:
        if not self.name:
            object.__setattr__(self, "name", default_name(self.key.get_secret_value()))
        elif not NAME.fullmatch(self.name):
            # The name is not shown: an entry written role:secret:name would print the secret here.
            raise ValueError(f"an API key name ({len(self.name)} characters) is not valid: letters, digits, "
                             "'.', '_', '@', '-', at most 64, starting with a letter or digit (is the entry "
                             "written role:name:key, in that order?)")
        return self

    @property
    def granted(self) -> Role:
        """The role the key has (`score` when its entry named none)."""
        return self.role or DEFAULT_ROLE


def parse_entry(entry: object) -> ApiKey:
    """One `ANOMALY_API_KEYS` item or key-file line as an `ApiKey` (see the module docstring).

    Raises:
        ValueError: a malformed entry (the message never contains the secret).
    """
    if isinstance(entry, ApiKey):
        return entry
    if isinstance(entry, SecretStr):
        entry = entry.get_secret_value()
    if isinstance(entry, str) and entry.strip().startswith("{"):
        try:
            entry = json.loads(entry)
        except ValueError as exc:
            raise ValueError(_safe(exc)) from None
    try:
        if isinstance(entry, dict):
            return ApiKey.model_validate(entry)
        if not isinstance(entry, str):
            raise ValueError(f"an API key entry must be text or a JSON object, not {type(entry).__name__}")
        text = entry.strip()
        role, sep, rest = text.partition(":")
        if sep and role in ROLES and ":" in rest:
            name, _, secret = rest.partition(":")
            return ApiKey(key=SecretStr(secret), role=role, name=name)  # type: ignore[arg-type]
        return ApiKey(key=SecretStr(text))
    except ValidationError as exc:  # its text would show the input, secret included
        raise ValueError(_safe(exc)) from None


def parse_file(text: str) -> list[ApiKey]:
    """The keys of a key file: one entry per line (`role:name:secret`, a JSON object, or a
    bare key); blank lines and lines starting with `#` are skipped.

    Raises:
        ValueError: naming the line of a malformed entry (never its secret).
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(parse_entry(line))
        except ValueError as exc:
            raise ValueError(f"line {number} of the API key file is not a valid key entry: "
                             f"{_safe(exc)}") from None
    return keys


def _safe(exc: ValueError) -> str:
    """A validation error's reasons without the input values (which may hold a secret)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join((f"{'.'.join(map(str, e['loc']))}: " if e.get("loc") else "")
                         + str(e.get("msg", "")).removeprefix("Value error, ")
                         for e in errors(include_input=False))
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg})"
    return str(exc)


def check_unique(keys: list[ApiKey]) -> list[ApiKey]:
    """`keys`, refused when two share a secret or a name.

    Raises:
        ValueError: naming the names involved.
    """
    secrets: dict[str, str] = {}
    names: set[str] = set()
    for k in keys:
        secret = k.key.get_secret_value()
        if secret in secrets:
            raise ValueError(f"API keys {secrets[secret]!r} and {k.name!r} are the same secret")
        if k.name in names:
            raise ValueError(f"two API keys are named {k.name!r}: names tell senders apart, give each "
                             "its own")
        secrets[secret] = k.name
        names.add(k.name)
    return keys
