"""``fraudscore``: one command line for the service, the model registry and the batch jobs.

Each module registers its commands on the one Typer app: ``serve`` (the online service),
``models`` (train, the registry, the database), ``client`` (score, health) and ``batch``
(nightly, replay, events). Every command builds what it needs through ``scoring_service.bootstrap``.

Only ``client`` (``score``, ``health``: grpc and the client package) is imported up front. The
other modules pull in the model, batch and database stack, so each is imported the first time one
of its commands is looked up (``fraudscore nightly``, or ``fraudscore --help``, which lists them
all): a probe's ``fraudscore health`` starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import typer
from typer._click import Command
from typer.core import TyperGroup

from scoring_service.cli import client

# Every top-level command and group, in the order ``fraudscore --help`` lists them (commands, then
# groups, as Typer orders them), with the module that registers it. tests/unit/test_cli_imports.py
# checks this table against what the modules' register() functions add.
COMMANDS: Mapping[str, str] = {
    "serve": "serve",
    "train": "models",
    "retrain": "models",
    "score": "client",
    "health": "client",
    "nightly": "batch",
    "replay": "batch",
    "model": "models",
    "db": "models",
    "events": "batch",
    "keys": "keys",
    "data": "data",
}
# Modules that add commands to another's group when imported: ``rollout``'s are on ``model``.
_ALSO_IMPORT: Mapping[str, tuple[str, ...]] = {"models": ("rollout",)}

_SETTINGS: dict[str, Any] = {"pretty_exceptions_enable": False}


def module_commands(module: str) -> dict[str, Command]:
    """The Click commands that ``scoring_service.cli.<module>`` registers (importing it, on first use)."""
    mod = importlib.import_module(f"scoring_service.cli.{module}")
    for extra in _ALSO_IMPORT.get(module, ()):
        importlib.import_module(f"scoring_service.cli.{extra}")
    holder = typer.Typer(**_SETTINGS)
    mod.register(holder)
    return dict(typer.main.get_group(holder).commands)


class _LazyCommands(MutableMapping[str, Command]):
    """A group's commands: the names known up front, each module's commands built on first lookup."""

    def __init__(self, loaded: MutableMapping[str, Command]) -> None:
        self._loaded = dict(loaded)

    def __getitem__(self, name: str) -> Command:
        if name not in self._loaded and name in COMMANDS:
            for key, command in module_commands(COMMANDS[name]).items():
                self._loaded.setdefault(key, command)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (name for name in self._loaded if name not in COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS) + sum(1 for name in self._loaded if name not in COMMANDS)


class _LazyGroup(TyperGroup):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # the names only: TyperGroup's own would build every command


app = typer.Typer(
    name="fraudscore",
    help="Real-time fraud scoring: a gRPC Score() service over a Redis cache of entity risk, "
    "GBDT models for unseen entities, and Kafka-fed batch jobs that refresh the cache.",
    no_args_is_help=True,
    cls=_LazyGroup,
    **_SETTINGS,
)
client.register(app)  # the rest: on first lookup, through COMMANDS


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
