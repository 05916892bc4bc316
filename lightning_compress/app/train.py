"""Train, compress and report: the Hydra app, run as `lightning-compress [group=option ...] [+compress=<recipe>]`
from any directory, or as `python train.py ...` in the checkout.

Every object comes from the recipes in `conf/` (packaged as `lightning_compress.conf`) through `_target_`, so pointing
a group at your own class needs no edit here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from lightning_compress.app.models import LIGHTNING_CHECKPOINT_KEYS, read_checkpoint
from lightning_compress.export import format_installed, recording_export_failures
from lightning_compress.network_call import NetworkCall, test_calls
from lightning_compress.report import CompressionReport, models_to_report
from lightning_compress.validation import check_integer, is_integer

log = logging.getLogger(__name__)


def epoch_at(fraction: float, minimum: int = 0, *, _root_: DictConfig) -> int:
    """``${epoch_at:0.75}`` in a recipe: that fraction of ``trainer.max_epochs``, rounded down (and at least
    ``minimum``), so that a recipe keeps its proportions when a run is made shorter or longer. A recipe states
    in ``compress.min_epochs`` the shortest run whose schedule still does everything it says."""
    max_epochs = OmegaConf.select(_root_, "trainer.max_epochs")
    name = OmegaConf.select(_root_, "compress.name")
    recipe = f"the {name} recipe" if name else "this recipe"
    if not is_integer(max_epochs) or max_epochs < 0:
        raise ValueError(
            f"trainer.max_epochs={max_epochs!r} gives {recipe} no length to place its epochs in: set a "
            "number of epochs, or the recipe's epochs themselves."
        )
    needed = OmegaConf.select(_root_, "compress.min_epochs", default=0)
    if max_epochs < needed:
        raise ValueError(
            f"trainer.max_epochs={max_epochs} is too short for {recipe}: its schedule needs at least "
            f"{needed} epochs (or set the recipe's epochs yourself, e.g. compress.callbacks.<callback>.start_epoch=0)."
        )
    return max(math.floor(fraction * max_epochs + 1e-9), minimum)  # 1e-9: 0.29 * 100 is 28.999...


OmegaConf.register_new_resolver("epoch_at", epoch_at, replace=True)


def installed_formats(*formats: str) -> list[str]:
    """``${installed_formats:torch_export,executorch}`` in a recipe: those export formats whose runtime is installed,
    in order. A recipe ships to an optional runtime where the user has it (``qat_llm``: ExecuTorch, where low-bit
    models run fast) and runs without it elsewhere; a format a user names themselves is checked strictly."""
    return [name for name in formats if format_installed(name)]


OmegaConf.register_new_resolver("installed_formats", installed_formats, replace=True)


class BeforeTraining(Exception):
    """A problem found before any training step: reported in one line, with exit code 2."""


class ReportError(Exception):
    """The trained models cannot be measured (no one network to call): one line, exit code 1; the checkpoints and
    exports stay."""


def _one_line(error: BaseException) -> str:
    """The line a user needs: the innermost error of Hydra's and OmegaConf's wrappers, and the detail of a
    message that ends in a colon (torch's "Error(s) in loading state_dict for ...:")."""
    while isinstance(error, InstantiationException | InterpolationResolutionError):
        inner = error.__cause__ or error.__context__  # OmegaConf re-raises a resolver's error as the context
        if inner is None:
            break
        error = inner
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = f"{lines[0]} {lines[1][:200]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    # A settings check's message stands alone; an unexpected kind of error (ImportError, say) says its kind.
    plain = (ValueError, TypeError, FileNotFoundError, MisconfigurationException, InstantiationException)
    return line if isinstance(error, plain) else f"{type(error).__name__}: {line}"


def _instantiate(node: DictConfig, key: str, **kwargs):
    """``instantiate(node)``; an error that names a constructor argument (``final_sparsity=...``) names the
    configuration key instead (``compress.callbacks.pruning.final_sparsity=...``), or the key the config fills
    the argument from (``model.block_size: ${data.block_size}`` -> ``data.block_size=...``).
    The argument of a nested object is found by its name and value (``model.student.checkpoint=...``); an app
    module's own key (``model.checkpoint=``) is renamed to the group it was built for (``teacher.checkpoint=``)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as error:  # noqa: BLE001 - constructors and Hydra raise many kinds; each becomes one line
        message = _one_line(error)
        argument = re.match(r"(?:model\.)?(\w+)=", message)
        where = _config_key(node, key, argument[1], message[argument.end() :]) if argument else None
        if where is not None:
            message = f"{where}{message[argument.end() - 1 :]}"
        raise BeforeTraining(message) from error


def _config_key(node: DictConfig, key: str, argument: str, after: str) -> str | None:
    """The configuration key of the constructor argument ``argument`` whose value the message shows first in
    ``after``: in ``node`` itself, else in a nested object's node; an interpolated value names its source."""
    raw = OmegaConf.to_container(node, resolve=False)
    if argument in raw:
        value = raw[argument]
        source = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
        return source[1] if source else f"{key}.{argument}"
    for child, value in raw.items():
        if isinstance(value, dict) and "_target_" in value and argument in value and after.startswith(repr(value[argument])):
            return f"{key}.{child}.{argument}"
    return None


def teacher_settings(cfg: DictConfig) -> DictConfig:
    """The teacher group without ``max_epochs``, which is train.py's setting rather than the module's."""
    settings = OmegaConf.to_container(cfg.teacher, resolve=True)
    settings.pop("max_epochs", None)
    return OmegaConf.create(settings)


def data_sizes(datamodule) -> dict[str, int]:
    """The sizes a model is built for, those the data module has (``num_classes``, ``num_channels``)."""
    sizes = {"num_classes": getattr(datamodule, "num_classes", None), "in_channels": getattr(datamodule, "num_channels", None)}
    return {name: value for name, value in sizes.items() if value is not None}


def for_the_given_target(node: DictConfig, key: str) -> None:
    """With ``<key>._target_=...`` on the command line (a user's own class), drop the group's other keys that its
    constructor does not take, in one info line: they were written for the group's own class (``architecture`` for
    the app's ``ImageClassifier``). Keys also given on the command line stay, and fail naming themselves if not taken."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    given = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    if f"{key}._target_" not in given:
        return
    try:
        parameters = inspect.signature(hydra.utils.get_object(node._target_)).parameters
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so, in one line
        return
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    dropped = [name for name in node if not name.startswith("_") and name not in parameters and f"{key}.{name}" not in given]
    if dropped:
        with open_dict(node):
            for name in dropped:
                del node[name]
        log.info("%s._target_=%s does not take %s: left out.", key, node._target_, ", ".join(f"{key}.{name}" for name in dropped))


def train_teacher(cfg: DictConfig, datamodule, output_dir: Path) -> str:
    """A distillation recipe without `teacher.checkpoint`: train the teacher first, as its own fit
    (once: a resumed run finds it in its output folder)."""
    path = output_dir / "teacher" / "teacher.ckpt"
    if path.is_file():
        log.info("Reusing the teacher trained earlier in this run: %s", path)
        return str(path)
    teacher = _instantiate(teacher_settings(cfg), "teacher", **data_sizes(datamodule), _convert_="all")
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
    """The LightningModule, sized for the data: ``num_classes`` and ``in_channels`` go to every object of the
    model config that takes them and does not set them (the model, a distillation student). A distillation
    model also gets the teacher module its group builds (loaded from ``teacher.checkpoint``, if given).
    Plain containers keep its checkpoints weights_only-loadable."""
    sizes = data_sizes(datamodule)
    _fill_sizes(cfg.model, sizes)
    modules = {}
    if "teacher" in cfg:
        modules["teacher"] = _instantiate(teacher_settings(cfg), "teacher", **sizes, _convert_="all")
    return _instantiate(cfg.model, "model", **modules, _convert_="all")


def _fill_sizes(node: DictConfig, sizes: dict[str, int]) -> None:
    """Set ``sizes`` in ``node`` and the objects nested in it, where their target takes them (by name, or
    through ``**kwargs``) and they are unset."""
    if "_target_" in node:
        try:
            parameters = inspect.signature(hydra.utils.get_object(node._target_)).parameters
        except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so, in one line
            parameters = {}
        takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
        with open_dict(node):
            for name, value in sizes.items():
                if (name not in node and (name in parameters or takes_any)) or OmegaConf.is_missing(node, name):
                    node[name] = value
    for child in node.values():
        if isinstance(child, DictConfig):
            _fill_sizes(child, sizes)


def deployment_input(example_input: NetworkCall, size: int | None) -> NetworkCall | None:
    """The example call with its image resized to ``size`` x ``size`` (bilinear), or ``None``: models trained on
    small images are also timed at the resolution they would serve."""
    if size is None:
        return None
    tensors = example_input.tensors()
    if not (len(tensors) == 1 and tensors[0].dim() == 4 and tensors[0].is_floating_point()):
        log.warning("report.latency_input_size=%s applies to image inputs; these are not: not timed at it.", size)
        return None
    resized = torch.nn.functional.interpolate(tensors[0], size=(size, size), mode="bilinear", align_corners=False)
    return example_input.with_tensors([resized])


def check_tasks(cfg: DictConfig) -> None:
    """The model, the data and the recipe must be made for the same task (a language model cannot train on
    images): one line naming them, before anything is built. A class says its task in its ``task`` attribute;
    a distillation module takes its teacher's."""

    def task(node: DictConfig | None) -> str | None:
        target = None if node is None else node.get("_target_")
        try:
            return getattr(hydra.utils.get_object(target), "task", None) if target else None
        except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so, in one line
            return None

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    named = {
        f"model={choices.get('model', cfg.model.get('_target_'))}": task(cfg.model) or task(cfg.get("teacher")),
        f"data={choices.get('data', cfg.data.get('_target_'))}": task(cfg.data),
        f"+compress={OmegaConf.select(cfg, 'compress.name')}": OmegaConf.select(cfg, "compress.task"),
    }
    given = {name: value for name, value in named.items() if value is not None}
    if len(set(given.values())) > 1:
        raise BeforeTraining(
            "these are made for different tasks: "
            + ", ".join(f"{name} ({value})" for name, value in given.items())
            + "; language models: model=byte_transformer data=python_source."
        )


def build(cfg: DictConfig):
    """Everything `main` needs, built and checked before any training starts."""
    check_tasks(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True)  # a recipe too long for trainer.max_epochs fails here, in one line
    except InterpolationResolutionError as error:
        raise BeforeTraining(_one_line(error)) from error
    try:
        check_integer("report.latency_input_size", cfg.report.get("latency_input_size"), minimum=1, none="the data's size only")
    except ValueError as error:
        raise BeforeTraining(str(error)) from error
    for key in ("data", "model"):
        for_the_given_target(cfg[key], key)
    datamodule = _instantiate(cfg.data, "data")
    try:
        datamodule.prepare_data()  # a missing dataset fails now, not after the trainer is set up
    except (FileNotFoundError, ValueError) as error:
        raise BeforeTraining(_one_line(error)) from error
    model = build_model(cfg, datamodule)
    # _convert_="all": plain dicts and lists, so that hyperparameters in checkpoints load with weights_only=True
    callbacks = [_instantiate(c, f"callbacks.{name}", _convert_="all") for name, c in cfg.callbacks.items()]
    recipe = cfg.get("compress", {}).get("callbacks", {})
    callbacks += [_instantiate(c, f"compress.callbacks.{name}", _convert_="all") for name, c in recipe.items()]
    loggers = [_instantiate(c, f"logger.{name}") for name, c in cfg.logger.items()]
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=[*callbacks, TrainingStarted()], logger=loggers)
    check_resume_checkpoint(cfg, model)
    return datamodule, model, trainer


class TrainingStarted(Callback):
    """Marks the first training batch: an error before it is a setting or a file to fix (one line, exit 2),
    one after it is a failure of the run."""

    def __init__(self) -> None:
        self.started = False

    def on_train_batch_start(self, *args) -> None:
        self.started = True


def _resume_file(cfg: DictConfig) -> Path | None:
    """The file ``ckpt_path`` names: a path, or ``last`` where this run folder has a ``last.ckpt``."""
    if cfg.ckpt_path is None or cfg.ckpt_path in ("best", "hpc", "registry"):
        return None
    if cfg.ckpt_path == "last":
        folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
        last = Path(folder) / "last.ckpt" if folder else None
        return last if last is not None and last.is_file() else None
    return Path(cfg.ckpt_path)


def check_resume_checkpoint(cfg: DictConfig, model: L.LightningModule) -> None:
    """``ckpt_path`` must be a readable Lightning checkpoint of this model: otherwise one line saying which
    problem it is, before anything trains (Lightning would fail with a traceback, mid-setup)."""
    path = _resume_file(cfg)
    if path is None:
        return
    where = f"ckpt_path={str(path)!r}"
    try:
        checkpoint = read_checkpoint(path, "ckpt_path")
    except (FileNotFoundError, ValueError) as error:
        raise BeforeTraining(str(error)) from error
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in LIGHTNING_CHECKPOINT_KEYS):
        raise BeforeTraining(
            f"{where} is not a Lightning checkpoint (it has no {list(LIGHTNING_CHECKPOINT_KEYS)}): "
            "to start from weights alone, give it as model.checkpoint."
        )
    other_model = f"{where} is a checkpoint of another model"
    saved = checkpoint.get("hyper_parameters") or {}
    for key in ("architecture", "num_classes", "in_channels", "architecture_options"):
        if key in saved and key in model.hparams and saved[key] != model.hparams[key]:
            raise BeforeTraining(f"{other_model}: {key}={saved[key]!r} there, {model.hparams[key]!r} here.")
    # Compression changes the structure (QAT fuses and renames layers, a shrink removes channels): the module's
    # own on_load_checkpoint rebuilds it (ImageClassifier's and DistillationModule's do), on a copy here, and
    # of what remains only a name both sides share can disagree.
    rebuilt = copy.deepcopy(model)
    try:
        rebuilt.on_load_checkpoint(checkpoint)
    except Exception as error:  # noqa: BLE001 - a structure the checkpoint describes but this model cannot take
        raise BeforeTraining(f"{other_model}: its structure cannot be rebuilt here ({_one_line(error)}).") from error
    expected = rebuilt.state_dict()
    shared = [key for key in checkpoint["state_dict"] if key in expected]
    if expected and not shared:
        example = next(iter(checkpoint["state_dict"]), None)
        raise BeforeTraining(f"{other_model}: none of its weights has a name of this model's (it has e.g. {example!r}).")
    parameters = dict(rebuilt.named_parameters())  # buffers such as per-channel fake-quant scales take their shape on load
    for key in (key for key in shared if key in parameters):
        if checkpoint["state_dict"][key].shape != expected[key].shape:
            raise BeforeTraining(
                f"{other_model}: {key!r} has shape {tuple(checkpoint['state_dict'][key].shape)}, "
                f"the model expects {tuple(expected[key].shape)}."
            )


@hydra.main(version_base="1.3", config_path="pkg://lightning_compress.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # Never delete an earlier run that is being resumed into the same folder.
    new_folder = {entry.name for entry in output_dir.iterdir()} <= {".hydra", f"{HydraConfig.get().job.name}.log"}
    try:
        with recording_export_failures() as failed_exports:
            result = run(cfg, output_dir)
    except BeforeTraining as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if rank_zero_only.rank == 0:  # under DDP every process fails alike: one line, from rank 0
            print(f"error: {error}", file=sys.stderr)
            # Nothing was trained: leave no half-filled output folder behind, unless it holds what an earlier
            # step made (a teacher trained for this run, say).
            if new_folder and not any(output_dir.rglob("*.ckpt")):
                shutil.rmtree(output_dir, ignore_errors=True)
        sys.exit(2)
    except ReportError as error:
        print(f"error: no compression report: {error}", file=sys.stderr)
        sys.exit(1)
    for failure in failed_exports:
        print(
            f"error: the {failure.export_format} export {failure.path} failed ({failure.reason}); checkpoints, "
            "the other exports and the report are written.",
            file=sys.stderr,
        )
    if failed_exports and HydraConfig.get().mode != RunMode.MULTIRUN:  # in a sweep, the other jobs still run
        sys.exit(1)
    return result


def run(cfg: DictConfig, output_dir: Path) -> float:
    """Build, train, test, report; returns the number a Hydra sweeper optimizes."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    started = next(callback for callback in trainer.callbacks if isinstance(callback, TrainingStarted))
    try:
        if "teacher" in cfg and cfg.teacher.checkpoint is None:
            cfg.teacher.checkpoint = train_teacher(cfg, datamodule, output_dir)
            L.seed_everything(cfg.seed, workers=True)
            model = build_model(cfg, datamodule)

        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except Exception as error:
            if started.started:
                raise
            message = _one_line(error)
            if cfg.ckpt_path is not None and "loading state_dict" in message:
                message = f"ckpt_path={cfg.ckpt_path!r} does not fit the model: {message}"
            raise BeforeTraining(message) from error
        trainer.test(model, datamodule=datamodule)
        if not trainer.is_global_zero:  # one report per run, written by rank 0
            return float(trainer.callback_metrics[cfg.optimized_metric])

        try:  # each test batch as training_step calls the network with it, whatever its forward takes
            calls = test_calls(trainer, model, datamodule.test_dataloader())
        except ValueError as error:
            raise ReportError(str(error)) from error
        example_input = calls[0].sample(1)
        report = CompressionReport.from_models(
            models_to_report(trainer, model),
            calls,
            example_input,
            runs=cfg.report.latency_runs,
            warmup=cfg.report.warmup_runs,
            deployment_input=deployment_input(example_input, cfg.report.latency_input_size),
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
