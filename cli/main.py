"""The `anomaly` Typer application: the client commands always; the serve, bench, train
and study commands when their extras are installed (a base install is the SDK only).

Exit codes, the same for every command (README, "Commands"):
  0 done; 1 the work failed (an image not scored, a check that did not pass, an unforeseen
  error: one line, `ANOMALY_TRACEBACK=1` shows the traceback); 2 bad usage or settings;
  3 and 4 `anomaly db` (a newer or foreign schema; an upgrade needed); 5 a server or database
  could not be reached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cli.client import UNREACHABLE_CODES
from cli.common import UNREACHABLE, database_unreachable, first_line
from edge_anomaly_client import AnomalyError

# Typer's (vendored) usage errors: its own message and exit code 2 already.
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(help="Industrial visual anomaly detection: score, serve, train.",
                  no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"anomaly {version('edge-anomaly')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("anomaly (not installed)")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Industrial visual anomaly detection: score, serve, train."""


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line and the exit code for an error a command did not handle itself."""
    if isinstance(exc, AnomalyError):
        return f"{exc.code}: {exc.message}", UNREACHABLE if exc.code in UNREACHABLE_CODES else 1
    if type(exc).__module__.startswith("sqlalchemy"):
        cause = first_line(getattr(exc, "orig", None) or exc)
        if "no such table" in cause or ("relation" in cause and "does not exist" in cause):
            return f"the database holds no inspection log (yet): {cause}", 1
        if database_unreachable(exc):
            return f"database unavailable: {cause}", UNREACHABLE
        return f"database error: {cause}", 1
    if isinstance(exc, OSError):
        return first_line(exc), 1
    return f"{type(exc).__name__}: {first_line(exc)}", 1


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command`, turning an error it did not handle into `error: <one line>` on stderr and
    the documented exit code (the traceback only with `ANOMALY_TRACEBACK=1`)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, USAGE_ERROR, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            line, code = describe_failure(exc)
            typer.secho(f"error: {line}", fg="red", err=True)
            if os.environ.get("ANOMALY_TRACEBACK"):
                traceback.print_exc()
            raise typer.Exit(code) from None

    return wrapper

# Command groups, in the order `anomaly --help` lists them, with the module each group
# needs that only its extra installs.
GROUPS = (("cli.client", None), ("cli.serve", "pydantic_settings"), ("cli.bench", "pydantic_settings"),
          ("cli.train", "torch"), ("cli.studies", "torch"))

# Training and the studies (registry/, studies/, torch) need Python 3.11; the serve and client
# commands run on 3.10 too (JetPack 6 on Jetson Orin). On 3.10 these commands are there, hidden,
# and say so, whether or not torch is installed (the `train` extra installs none on 3.10).
TRAINING_GROUPS = ("cli.train", "cli.studies")


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def _needs_python_311(name: str):  # type: ignore[no-untyped-def]
    def refuse() -> None:
        typer.echo(f"anomaly {name}: training and the studies need Python 3.11 or newer; this is "
                   f"Python {sys.version_info.major}.{sys.version_info.minor}, where only the serve and "
                   "client commands run (docs/deploy.md, Jetson)", err=True)
        raise typer.Exit(2)

    return refuse


for _group, _needs in GROUPS:
    if _group in TRAINING_GROUPS and sys.version_info < (3, 11):
        for _name in importlib.import_module(_group).COMMANDS:
            app.command(_name, hidden=True, add_help_option=False,
                        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                        help="Needs Python 3.11.")(_needs_python_311(_name))
    elif _installed(_needs):
        for _name, _command in importlib.import_module(_group).COMMANDS.items():
            if isinstance(_command, typer.Typer):  # a group of sub-commands (`anomaly reference add`)
                for _sub in _command.registered_commands:
                    _sub.callback = one_line_errors(_sub.callback)
                app.add_typer(_command, name=_name)
            else:
                app.command(_name)(one_line_errors(_command))

if __name__ == "__main__":
    app()
