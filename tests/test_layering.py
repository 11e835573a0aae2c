"""Lower floors never import upward: nothing under models/, data/, fps/ or lit/ imports a CLI module or the training
schema (issue 20, item 2).

The CLIs (`python -m fpsa_train[.preprocess|.sample|.export|.calibrate|.evaluate]`) and fpsa_train/config.py (the
Hydra schema that composes every group) sit on top; the library floors take a group's dataclass from the group's
own home (models/config.py, data/config.py, flow.py, fps/schedule.py, lit/config.py). Checked twice: by reading
every import statement (also those inside functions, which an import at load time would not reach), and by
importing every module of those floors in a fresh interpreter (which also catches an upward import made through a
top-level library module such as flow.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fpsa_train

PACKAGE = Path(fpsa_train.__file__).parent
FLOORS = ("models", "data", "fps", "lit")
CLIS = ("preprocess", "sample", "export", "train", "calibrate", "evaluate", "__main__")
FORBIDDEN = ("fpsa_train.config", *(f"fpsa_train.{cli}" for cli in CLIS))
# The group schemas: plain dataclasses, which must not need Hydra to be imported.
SCHEMAS = ("fpsa_train.models.config", "fpsa_train.data.config", "fpsa_train.flow", "fpsa_train.fps.schedule",
           "fpsa_train.lit.config")


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for every module an import statement of `source` (a module of `package`) names, at any
    depth; `from a import b` counts as `a` and as `a.b` (b may be a module); relative imports are resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def floor_files() -> list[tuple[Path, str]]:
    """(file, its package) for every module under the lower floors."""
    return [(path, ".".join(("fpsa_train", *path.relative_to(PACKAGE).parent.parts)))
            for floor in FLOORS for path in sorted((PACKAGE / floor).rglob("*.py"))]


def test_no_lower_floor_imports_a_cli_or_the_training_schema():
    bad = {}  # "file:line" → the forbidden module (`from fpsa_train.config import X` named once, not per name)
    for path, package in floor_files():
        for line, name in imported_modules(path.read_text(), package):
            if _forbidden(name):
                bad.setdefault(f"{path.relative_to(PACKAGE.parent)}:{line}", name)
    bad = [f"{where} imports {name}" for where, name in bad.items()]
    assert not bad, ("lower floors must not import a CLI module or fpsa_train.config (take a group's dataclass from "
                     "its own home, library code from a library module):\n  " + "\n  ".join(bad))


def test_the_checker_sees_every_form_of_import():
    """Absolute, from the package, relative and inside a function: each is caught."""
    source = ("import fpsa_train.config\nfrom fpsa_train import sample\nfrom .. import export\n"
              "from ..lit import config\ndef f():\n    from fpsa_train.train import train\n")
    found = sorted({name for _, name in imported_modules(source, "fpsa_train.lit") if _forbidden(name)})
    assert found == ["fpsa_train.config", "fpsa_train.export", "fpsa_train.sample", "fpsa_train.train",
                     "fpsa_train.train.train"], found


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print('\\n'.join(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_lower_floors_loads_no_cli_and_no_training_schema():
    modules = [package if path.stem == "__init__" else f"{package}.{path.stem}" for path, package in floor_files()]
    loaded = sorted(m for m in _loaded_after_importing(modules) if _forbidden(m))
    assert not loaded, f"importing models/, data/, fps/ and lit/ loads {loaded}"


def test_the_group_schemas_import_no_hydra():
    loaded = sorted(m for m in _loaded_after_importing(list(SCHEMAS)) if m.split(".")[0] == "hydra")
    assert not loaded, f"importing the group schemas {SCHEMAS} loads {loaded[:5]}"
