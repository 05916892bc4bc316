"""The callbacks under LightningCLI, from the YAML the documentation shows (examples/lightning_cli.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT

EXAMPLE, CONFIG = ROOT / "examples" / "lightning_cli.py", ROOT / "examples" / "lightning_cli.yaml"


def _cli(tmp_path: Path, config: Path = CONFIG) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    command = [sys.executable, str(EXAMPLE), "fit", "--config", str(config), "--trainer.enable_progress_bar=false"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_the_documented_yaml_trains_shrinks_quantizes_and_exports(tmp_path: Path):
    result = _cli(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removes its channels at start_epoch=2" in result.stdout + result.stderr  # pruning shrinks when QAT starts
    import torchao.quantization.pt2e  # noqa: F401 - defines the quantize ops the program holds

    int8 = torch.export.load(str(tmp_path / "checkpoints" / "model_int8.pt2")).module()
    assert (tmp_path / "checkpoints" / "model_int8.onnx").is_file()
    with torch.no_grad():
        assert int8(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_bad_setting_in_the_yaml_is_the_callbacks_own_one_line_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("final_sparsity: 0.5", "final_sparsity: 1.5"))
    result = _cli(tmp_path, bad)
    assert result.returncode != 0 and "final_sparsity=1.5" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
