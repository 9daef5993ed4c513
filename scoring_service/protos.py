"""Generated protobuf/gRPC stubs, built from ``protos/`` on first import.

The stubs are build output: they live in ``scoring_service/_generated`` (git-ignored) and are
regenerated whenever a ``.proto`` file is newer than them, so a fresh clone needs no extra step.
``python -m scoring_service.protos`` forces a rebuild.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent
_PROTO_DIR = _ROOT.parent / "protos"
_OUT = _ROOT / "_generated"
_SOURCES = sorted(_PROTO_DIR.glob("fraudscore/v1/*.proto"))


def _stale() -> bool:
    marker = _OUT / "fraudscore" / "v1" / "scoring_pb2.py"
    if not marker.exists():
        return True
    built = marker.stat().st_mtime
    return any(src.stat().st_mtime > built for src in _SOURCES)


def generate(force: bool = False) -> None:
    if not _SOURCES:  # installed without the protos folder: the stubs must already be there
        return
    if not force and not _stale():
        return
    import grpc_tools
    from grpc_tools import protoc

    _OUT.mkdir(exist_ok=True)
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    tmp = _OUT.with_name(f"_generated.tmp{id(_OUT)}")
    tmp.mkdir(exist_ok=True)
    args = [
        "protoc",
        f"-I{_PROTO_DIR}",
        f"-I{include}",
        f"--python_out={tmp}",
        f"--grpc_python_out={tmp}",
        f"--pyi_out={tmp}",
        *[str(s.relative_to(_PROTO_DIR)) for s in _SOURCES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {_PROTO_DIR}")
    for pkg in (tmp / "fraudscore", tmp / "fraudscore" / "v1"):
        (pkg / "__init__.py").touch()
    (tmp / "__init__.py").touch()
    # Move into place file by file: concurrent first imports (several server processes) race
    # harmlessly because each rename is atomic and the contents are identical.
    for path in sorted(tmp.rglob("*")):
        target = _OUT / path.relative_to(tmp)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            path.replace(_OUT / path.relative_to(tmp))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


generate()
if str(_OUT) not in sys.path:
    # The generated modules import each other as ``fraudscore.v1.*``.
    sys.path.insert(0, str(_OUT))

# Typed as Any: the stubs are generated at first import, so type checkers cannot see their classes.
scoring_pb2: Any = importlib.import_module("fraudscore.v1.scoring_pb2")
scoring_pb2_grpc: Any = importlib.import_module("fraudscore.v1.scoring_pb2_grpc")
events_pb2: Any = importlib.import_module("fraudscore.v1.events_pb2")
admin_pb2: Any = importlib.import_module("fraudscore.v1.admin_pb2")
admin_pb2_grpc: Any = importlib.import_module("fraudscore.v1.admin_pb2_grpc")

__all__ = ["admin_pb2", "admin_pb2_grpc", "events_pb2", "generate", "scoring_pb2", "scoring_pb2_grpc"]

if __name__ == "__main__":
    generate(force=True)
    print(f"generated stubs in {_OUT}")
