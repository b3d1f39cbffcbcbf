"""Helpers every command group shares: list and JSON options, the command line as run,
settings errors, and the SDK's security options."""

from __future__ import annotations

import functools
import inspect
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from service.settings import Settings


def split_csv(value: str) -> list[str]:
    """The items of a comma-separated option value (`"a,b,"` → `["a", "b"]`)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def json_object(value: str, param_hint: str) -> dict[str, object]:
    """An option given as a JSON object (`""` → `{}`).

    Raises:
        typer.BadParameter: not JSON, or not an object.
    """
    if not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=param_hint) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object, e.g. '{\"teacher\": \"distilled\"}'",
                                 param_hint=param_hint)
    return parsed


def model_reference(value: str, allow_version: bool = True) -> tuple[str, str, int]:
    """(name, alias, version) from `--model`: a registered model's name, or MLflow's
    `models:/<name>@<alias>` or `models:/<name>/<version>` (alias "" and version 0 = not given).

    Raises:
        typer.BadParameter: a `models:/` URI of another form.
    """
    if not value.startswith("models:/"):
        return value, "", 0
    rest = value.removeprefix("models:/")
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in rest:
        return name, alias, 0
    name, slash, version = rest.partition("/")
    if slash and name and version.isdigit() and int(version) > 0 and allow_version:
        return name, "", int(version)
    forms = "models:/<name>@<alias>" + (" or models:/<name>/<version>" if allow_version else "")
    raise typer.BadParameter(f"{value!r} is not of the form {forms}", param_hint="--model")


def print_json(value: object, indent: int | None = 1) -> None:
    """`value` as JSON on stdout (bytes as base64, dataclasses and datetimes as text)."""
    import base64
    import dataclasses
    from datetime import date

    def default(o: object) -> object:
        if isinstance(o, bytes):
            return base64.b64encode(o).decode()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, date | Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON")

    typer.echo(json.dumps(value, indent=indent, default=default))


def command_line() -> str:
    """The command as it was typed, quoted so that it can be pasted back (for reports)."""
    return "anomaly " + shlex.join(sys.argv[1:])


def echo_err(message: str) -> None:
    """A progress line on stderr (stdout keeps the results)."""
    typer.echo(message, err=True)


UNREACHABLE = 5  # the exit code of every command when a server or database could not be reached


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an error's text (its type's name when it has none), cut at `limit`."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit is not None else line


def database_unreachable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error says the database could not be reached or opened (read by
    name: the base install, where the CLI also runs, has no SQLAlchemy)."""
    return type(exc).__module__.startswith("sqlalchemy") and \
        type(exc).__name__ in ("OperationalError", "InterfaceError")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` in red on stderr; returns the `typer.Exit` to raise."""
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def settings(options: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from the environment, the settings file and the given options (None = not
    given; `options` names the option of each field, for errors). Settings that cannot be used
    (an unknown `ANOMALY_*` variable, a port out of range, TLS half set up) are one-line errors
    naming the variable, option or file key, exit code 2."""
    from service.settings import SettingsError, load_settings

    try:
        return load_settings(options, **overrides)
    except SettingsError as exc:
        for line in exc.lines:
            typer.secho(f"error: invalid settings: {line}", fg="red", err=True)
        raise typer.Exit(2) from None


# The SDK's security options, the same on every command that talks to a server
# (`with_security` adds them).
SECURITY_OPTIONS: list[tuple[str, object, object]] = [
    ("api_key", Annotated[str, typer.Option(envvar="ANOMALY_API_KEY", show_default=False,
                                            help="API key (x-api-key); or set ANOMALY_API_KEY")], ""),
    ("api_key_file", Annotated[Path | None, typer.Option(help="file whose first line is the API key")], None),
    ("tls_ca", Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate to trust (TLS / HTTPS)")],
     None),
    ("client_cert", Annotated[Path | None, typer.Option(help="client certificate (mutual TLS)")], None),
    ("client_key", Annotated[Path | None, typer.Option(help="client private key (mutual TLS)")], None),
]


def security(api_key: str, api_key_file: Path | None, tls_ca: Path | None, client_cert: Path | None,
             client_key: Path | None) -> dict:
    """SDK keyword arguments from the security options (a key file wins over nothing)."""
    if api_key_file is not None and not api_key:
        try:
            api_key = api_key_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise typer.BadParameter(f"cannot read an API key from {api_key_file}: {exc}",
                                     param_hint="--api-key-file") from exc
    if bool(client_cert) != bool(client_key):
        raise typer.BadParameter("give both --client-cert and --client-key, or neither")
    return {"api_key": api_key, "tls_ca_file": tls_ca, "client_cert_file": client_cert,
            "client_key_file": client_key}


def with_security(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the security options (`--api-key`, `--api-key-file`, `--tls-ca`,
    `--client-cert`, `--client-key`); it receives them as `sdk_options`, the SDK keyword
    arguments they make."""
    signature = inspect.signature(command, eval_str=True)
    names = [name for name, _, _ in SECURITY_OPTIONS]

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        options = security(*(kwargs.pop(name) for name in names))  # type: ignore[arg-type]
        command(*args, sdk_options=options, **kwargs)

    params = [p for p in signature.parameters.values() if p.name != "sdk_options"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
               for name, annotation, default in SECURITY_OPTIONS]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper
