"""The documentation site builds with every warning an error: its links, its API reference (from the docstrings)
and its benchmark pages (each built from its results file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_documentation_builds_strictly(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "callbacks" / "index.html").read_text()
    assert "freeze_observer_epoch" in reference and "final_sparsity" in reference  # rendered from the docstrings


def test_every_benchmark_results_file_has_its_page():
    pages = "".join(path.read_text() for path in (ROOT / "docs" / "benchmarks").glob("*.md"))
    for results in (ROOT / "benchmarks" / "results").glob("*.md"):
        assert f'--8<-- "benchmarks/results/{results.name}"' in pages, results.name
