"""The package as it would be published: a wheel that holds the library, the app and its recipes, and a command
that runs the app from any directory, without the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

RANGED = {"torch", "torchvision", "torchao", "lightning", "torch-pruning"}


def test_the_known_good_set_lies_inside_the_declared_ranges():
    """constraints.txt (what the README's commands and CI install) must satisfy pyproject's ranges, or the two
    commands would fail to resolve; and every ranged dependency has its tested version there."""
    import tomllib

    declared = {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(line)
        declared.setdefault(requirement.name, requirement.specifier)
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip()] = version.strip()
    assert RANGED <= set(pinned)
    for name, version in pinned.items():
        assert name in declared, f"{name} is pinned in constraints.txt but no dependency of the project"
        assert declared[name].contains(version), f"constraints.txt's {name}=={version} is outside {declared[name]}"
    for command in ("pip install -e . -c constraints.txt", 'pip install -e ".[dev]" -c constraints.txt'):
        assert command in (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]" -c constraints.txt' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_the_wheel_holds_the_app_and_its_recipes_and_its_command_runs_a_recipe_anywhere(tmp_path: Path):
    wheels, site, elsewhere, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # built from a copy: setuptools writes build/ beside the sources it builds
    ignored = shutil.ignore_patterns(".git", ".venv", "build", "outputs", "multirun", "site", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=ignored)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("lightning_compress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "lightning_compress/app/train.py",
        "lightning_compress/conf/config.yaml",
        "lightning_compress/conf/compress/qat.yaml",
    } <= names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "lightning-compress = lightning_compress.app.train:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = zipfile.ZipFile(wheel).read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    requirements = {
        Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    }
    for requirement in requirements:
        if requirement.name in RANGED:  # installs beside the torch a user has: no exact pin
            assert not any(spec.operator in ("==", "===") for spec in requirement.specifier), requirement
    assert RANGED <= {requirement.name for requirement in requirements}

    # installed apart from the checkout (its dependencies are this environment's), run from another directory
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    where = subprocess.run(
        [sys.executable, "-c", "import lightning_compress; print(lightning_compress.__file__, lightning_compress.__version__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)) and "0+unknown" not in where.stdout
    result = subprocess.run(
        [
            str(site / "bin" / "lightning-compress"),
            "+compress=qat",
            "trainer.max_epochs=2",
            "report.latency_runs=3",
            "hydra.run.dir=run",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [row["name"] for row in json.loads((elsewhere / "run" / "report.json").read_text())["rows"]]
    assert rows == ["fp32", "fake-quant", "int8"] and (elsewhere / "run" / "checkpoints" / "model_int8.pt2").is_file()
