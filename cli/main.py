"""The `anomaly` Typer application: the client commands always; the serve, bench, train
and study commands when their extras are installed (a base install is the SDK only)."""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(help="Industrial visual anomaly detection: score, serve, train.",
                  no_args_is_help=True)

# Command groups, in the order `anomaly --help` lists them, with the module each group
# needs that only its extra installs.
GROUPS = (("cli.client", None), ("cli.serve", "pydantic_settings"), ("cli.bench", "pydantic_settings"),
          ("cli.train", "torch"), ("cli.studies", "torch"))


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


for _group, _needs in GROUPS:
    if _installed(_needs):
        for _name, _command in importlib.import_module(_group).COMMANDS.items():
            if isinstance(_command, typer.Typer):  # a group of sub-commands (`anomaly reference add`)
                app.add_typer(_command, name=_name)
            else:
                app.command(_name)(_command)

if __name__ == "__main__":
    app()
