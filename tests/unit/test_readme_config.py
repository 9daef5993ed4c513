"""The README's configuration table lists every setting (made by scripts/config_table.py)."""

from __future__ import annotations

import importlib.util

from scoring_service.config import Settings
from tests.servers.common import REPO_ROOT


def _table_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("config_table", REPO_ROOT / "scripts" / "config_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_in_the_readme_table():
    table = _table_module()
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    section = section[: section.index("\n## ", 1)]
    missing = [name for name, field in Settings.model_fields.items()
               if not any(f"`{env}`" in section for env in table.env_names(name, field))]
    assert not missing, f"settings missing from the README table (run scripts/config_table.py): {missing}"


def test_the_generated_rows_name_each_setting_once():
    rows = _table_module().rows()
    assert len(rows) == len(Settings.model_fields) + 2
