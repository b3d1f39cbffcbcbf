"""Helpers every command group shares: list options, the command line as run, settings
errors, and the SDK's security options."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from service.settings import Settings


def split_csv(value: str) -> list[str]:
    """The items of a comma-separated option value (`"a,b,"` → `["a", "b"]`)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def command_line() -> str:
    """The command as it was typed, quoted so that it can be pasted back (for reports)."""
    return "anomaly " + shlex.join(sys.argv[1:])


def echo_err(message: str) -> None:
    """A progress line on stderr (stdout keeps the results)."""
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` in red on stderr; returns the `typer.Exit` to raise."""
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def settings(**overrides: object) -> Settings:
    """Settings from the environment and the given options (None = not given); an
    inconsistent configuration (e.g. TLS half set up) is a one-line error, exit code 2."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            typer.secho(f"error: invalid settings{f' ({where})' if where else ''}: "
                        f"{error['msg'].removeprefix('Value error, ')}", fg="red", err=True)
        raise typer.Exit(2) from None


# The SDK's security options, the same on every command that talks to a server.
ApiKey = Annotated[str, typer.Option(envvar="ANOMALY_API_KEY", show_default=False,
                                     help="API key (x-api-key); or set ANOMALY_API_KEY")]
ApiKeyFile = Annotated[Path | None, typer.Option(help="file whose first line is the API key")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate to trust (TLS / HTTPS)")]
ClientCert = Annotated[Path | None, typer.Option(help="client certificate (mutual TLS)")]
ClientKey = Annotated[Path | None, typer.Option(help="client private key (mutual TLS)")]


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
