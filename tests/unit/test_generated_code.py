"""The generated `kms` package matches protos/: regenerate with `python scripts/gen_protos.py`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def _differences(committed: Path, fresh: Path) -> list[str]:
    old, new = _files(committed), _files(fresh)
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    stale = _differences(REPO / "kms", tmp_path / "kms")
    assert not stale, f"kms/ is stale; run: python scripts/gen_protos.py ({stale})"
