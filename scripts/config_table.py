"""Print the README's configuration table from ``scoring_service.config.Settings``.

Run ``uv run python scripts/config_table.py`` and paste the output under "## Configuration";
``tests/unit/test_readme_config.py`` fails when a setting is missing from the README.
"""

from __future__ import annotations

from pydantic.fields import FieldInfo

from scoring_service.config import Settings


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set ``name``: its aliases, else FRAUDSCORE_<NAME>."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return [str(c) for c in choices]
    return [f"FRAUDSCORE_{name.upper()}"]


def rows() -> list[str]:
    out = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        names = env_names(name, field)
        label = f"`{names[-1]}` (or `{names[0]}`)" if len(names) > 1 else f"`{names[0]}`"
        default = field.default
        shown = "unset" if default is None else f"`{getattr(default, 'value', default)}`"
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| {label} | {shown} | {meaning} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
