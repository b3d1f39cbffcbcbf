"""The `anomaly` Typer application: the client commands always; the serve, bench, train
and study commands when their extras are installed (a base install is the SDK only)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

app = typer.Typer(help="Industrial visual anomaly detection: score, serve, train.",
                  no_args_is_help=True)

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
                app.add_typer(_command, name=_name)
            else:
                app.command(_name)(_command)

if __name__ == "__main__":
    app()
