"""Train, compress and report: `python train.py [group=option ...] [+compress=<recipe>]`.

Every object comes from `conf/` through `_target_`, so pointing a group at your own class needs no edit here.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_compress.models import ImageClassifier
from lightning_compress.report import CompressionReport, models_to_report

log = logging.getLogger(__name__)


def _configuration_error(error: Exception) -> str:
    """The one line a user needs: Hydra wraps constructor errors, the innermost message names the key."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def train_teacher(cfg: DictConfig, datamodule, output_dir: Path) -> str:
    """A distillation recipe without `teacher.checkpoint`: train the teacher first, as its own fit
    (once: a resumed run finds it in its output folder)."""
    path = output_dir / "teacher" / "teacher.ckpt"
    if path.is_file():
        log.info("Reusing the teacher trained earlier in this run: %s", path)
        return str(path)
    teacher = ImageClassifier(
        cfg.teacher.architecture,
        num_classes=datamodule.num_classes,
        in_channels=datamodule.num_channels,
        lr=cfg.teacher.lr,
        architecture_options=dict(cfg.teacher.architecture_options or {}),
    )
    trainer = instantiate(
        cfg.trainer,
        max_epochs=cfg.teacher.max_epochs,
        default_root_dir=output_dir / "teacher",
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(teacher, datamodule=datamodule)
    trainer.save_checkpoint(path, weights_only=True)
    log.info("Teacher trained for %d epochs, saved to %s", cfg.teacher.max_epochs, path)
    return str(path)


def build_model(cfg: DictConfig, datamodule):
    """The LightningModule, sized for the data; plain containers keep its checkpoints weights_only-loadable."""
    return instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels, _convert_="all")


def build(cfg: DictConfig):
    """Everything `main` needs, built and checked before any training starts."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # a missing dataset fails now, not after the trainer is set up
    model = build_model(cfg, datamodule)
    # _convert_="all": plain dicts and lists, so that hyperparameters in checkpoints load with weights_only=True
    callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values()]
    callbacks += [instantiate(c, _convert_="all") for c in cfg.get("compress", {}).get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return datamodule, model, trainer


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    try:
        datamodule, model, trainer = build(cfg)
    except (InstantiationException, ValueError, FileNotFoundError) as error:
        # Nothing was trained: leave no half-filled output folder behind (but never delete an earlier run
        # that is being resumed into the same folder).
        if {entry.name for entry in output_dir.iterdir()} <= {".hydra", f"{HydraConfig.get().job.name}.log"}:
            shutil.rmtree(output_dir, ignore_errors=True)
        print(f"error: {_configuration_error(error)}", file=sys.stderr)
        sys.exit(2)
    if "teacher" in cfg and cfg.teacher.checkpoint is None:
        cfg.teacher.checkpoint = train_teacher(cfg, datamodule, output_dir)
        L.seed_everything(cfg.seed, workers=True)
        model = build_model(cfg, datamodule)

    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        trainer.test(model, datamodule=datamodule)
        if not trainer.is_global_zero:  # one report per run, written by rank 0
            return float(trainer.callback_metrics[cfg.optimized_metric])

        test_loader = datamodule.test_dataloader()
        example_input = next(iter(test_loader))[0][:1]
        report = CompressionReport.from_models(
            models_to_report(trainer, model),
            test_loader,
            example_input,
            runs=cfg.report.latency_runs,
            warmup=cfg.report.warmup_runs,
        )
        report.print()
        report.save(output_dir / "report.json")
        report.log_to(trainer.loggers)
        log.info("Report written to %s", output_dir / "report.json")
        if cfg.objective.nonzero_budget is None:
            return float(trainer.callback_metrics[cfg.optimized_metric])
        judged = next((row for row in report.measurements if row.name == cfg.objective.model), None)
        if judged is None:
            raise ValueError(
                f"objective.model={cfg.objective.model!r} is not a report row: rows are "
                f"{[row.name for row in report.measurements]}."
            )
        return judged.accuracy - max(0.0, judged.nonzero_parameters / cfg.objective.nonzero_budget - 1.0)
    finally:
        # One W&B run per job: without this, a -m multirun appends every job to the first run.
        if any(type(logger).__name__ == "WandbLogger" for logger in trainer.loggers):
            import wandb

            wandb.finish()


if __name__ == "__main__":
    main()
