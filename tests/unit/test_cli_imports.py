"""``fraudscore score`` and ``fraudscore health`` import only what they need (issue 23).

A probe runs ``fraudscore health`` every few seconds: it must not pay for the model, batch and
database stack. These tests check what gets imported, not how long it takes, so a loaded machine
cannot fail them. The lazily registered commands are checked against the eager registration, so
``fraudscore --help`` and every command stay what they were.
"""

from __future__ import annotations

import json
import subprocess
import sys

import typer
from typer.main import get_command
from typer.testing import CliRunner

from tests.servers.common import REPO_ROOT

# What the client commands must never import: the model, batch, data and database stack, the
# service itself, the settings, and the CLI's other command modules.
FORBIDDEN = (
    "xgboost", "lightgbm", "sklearn", "pandas", "numpy", "pyarrow", "sqlalchemy", "alembic", "redis",
    "confluent_kafka", "prometheus_client", "structlog",
    "scoring_service.bootstrap", "scoring_service.config", "scoring_service.online", "scoring_service.adapters",
    "scoring_service.core", "scoring_service.batch", "scoring_service.training",
    "scoring_service.cli.serve", "scoring_service.cli.models", "scoring_service.cli.rollout",
    "scoring_service.cli.batch", "scoring_service.cli.keys", "scoring_service.cli.data",
    "scoring_service.cli.admin_client",
)

# Runs in a fresh interpreter: the commands' --help, and real calls to a closed port (refused, exit 1).
_PROBE = """
import json, sys
from typer.testing import CliRunner
from scoring_service.cli import app

runner = CliRunner()
codes = {}
for args in (["score", "--help"], ["health", "--help"], ["health", "--address", "127.0.0.1:1", "--timeout", "2"],
             ["score", "--customer", "1", "--terminal", "2", "--amount", "10", "--address", "127.0.0.1:1",
              "--timeout", "2", "--retries", "0", "--json"]):
    result = runner.invoke(app, args, env={"FRAUDSCORE_API_KEY": None})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    codes[" ".join(args[:2])] = result.exit_code
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def _imported(name: str, modules: list[str]) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_score_and_health_import_only_the_client_path() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["codes"] == {"score --help": 0, "health --help": 0, "health --address": 1, "score --customer": 1}
    modules = report["modules"]
    assert not [name for name in FORBIDDEN if _imported(name, modules)]
    # What they do use: the client package over grpc and the generated stubs.
    assert {"fraudscore_client", "grpc", "scoring_service.protos", "scoring_service.cli.client"} <= set(modules)


def _eager_app() -> typer.Typer:
    """The app as it was built before issue 23: every module imported and registered up front."""
    from scoring_service.cli import app, batch, client, data, keys, models, rollout, serve

    eager = typer.Typer(name=app.info.name, help=app.info.help, no_args_is_help=True, pretty_exceptions_enable=False)
    for module in (serve, models, rollout, client, batch, keys, data):
        module.register(eager)
    return eager


def test_the_command_table_matches_what_the_modules_register() -> None:
    from scoring_service.cli import COMMANDS, app, module_commands

    eager = get_command(_eager_app()).commands  # type: ignore[attr-defined]
    assert list(COMMANDS) == list(eager)  # the same commands, in the same order
    for name, module in COMMANDS.items():
        assert name in module_commands(module), f"{name}: not registered by scoring_service.cli.{module}"
    assert list(get_command(app).commands) == list(eager)  # type: ignore[attr-defined]


def test_help_and_errors_are_those_of_the_eager_app() -> None:
    from scoring_service.cli import app

    eager = _eager_app()
    runner = CliRunner()
    env = {"COLUMNS": "120", "FRAUDSCORE_API_KEY": None}
    for args in ([], ["--help"], ["model", "--help"], ["model", "canary", "--help"], ["events", "publish", "--help"],
                 ["nightly", "--help"], ["score", "--help"], ["scor"], ["model", "statu"], ["health", "--timeout", "x"]):
        lazy_result, eager_result = runner.invoke(app, args, env=env), runner.invoke(eager, args, env=env)
        assert (lazy_result.exit_code, lazy_result.output) == (eager_result.exit_code, eager_result.output), args
