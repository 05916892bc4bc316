"""The direction of imports: the app (``lightning_compress.app``, ``train.py``, ``conf/``) builds on the library,
never the reverse, so a user of the callbacks in their own script needs neither the app nor Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning_compress

PACKAGE = Path(lightning_compress.__file__).parent
FORBIDDEN = ("lightning_compress.app", "hydra", "omegaconf")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_app_hydra_or_omegaconf():
    library = [path for path in PACKAGE.rglob("*.py") if "app" not in path.relative_to(PACKAGE).parts]
    assert len(library) > 10
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in _imports(path) if name.startswith(FORBIDDEN)) for path in library
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_importing_the_public_names_loads_no_app_module():
    code = (
        "import sys; from lightning_compress import DistillationModule, DynamicQuantization, MagnitudePruning, "
        "PostTrainingQuantization, QuantizationAwareTraining; "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning_compress.app', 'hydra', 'omegaconf'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
