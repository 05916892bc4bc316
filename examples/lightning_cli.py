"""LightningCLI with the compression callbacks: `python examples/lightning_cli.py fit --config examples/lightning_cli.yaml`.

The callbacks are plain Lightning callbacks, so LightningCLI builds them from a YAML's ``trainer.callbacks`` list
(``class_path`` and ``init_args``), with every constructor check they make; nothing here knows about them.
"""

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI()
