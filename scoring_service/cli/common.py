"""What every ``fraudscore`` command shares: the consoles, the one error exit, the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:  # the settings (pydantic, the online options) load on use: `score` and `health` need none
    from scoring_service.config import Settings

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input, 1: a failed run)."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, whatever the terminal's width
    raise typer.Exit(code)


def cli_settings(**overrides: Any) -> Settings:
    """The environment's settings with the command's flags (those given) on top; logging set up.

    A bad value (flag or environment variable) is a clear error naming the setting, exit 2."""
    from scoring_service.config import load_settings
    from scoring_service.logging import configure_logging

    try:
        settings = load_settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: it names the setting
        fail(f"invalid configuration: {exc}")
    configure_logging(settings.log_format, settings.log_level)
    return settings


def parse_time(value: str | None, name: str) -> float | None:
    """A CLI time flag (ISO 8601, a date, or epoch seconds) as epoch seconds; None stays None."""
    if value is None:
        return None
    from scoring_service.core.features import epoch_seconds

    try:
        return epoch_seconds(value)
    except (ValueError, TypeError):
        fail(f"{name}: not a time: {value!r} (ISO 8601, a date, or epoch seconds)")
