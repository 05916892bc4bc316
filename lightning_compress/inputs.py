"""How the callbacks learn to call a user's networks: by watching the user's own ``training_step``.

A LightningModule's ``forward`` may take anything (several tensors, keywords, a dict) or never be called at
all (a ``training_step`` that calls ``self.net(**batch)``). Rather than guess, the callbacks run
``training_step`` on real training batches and record the arguments that each submodule of interest
receives (forward pre-hooks with keyword arguments). The same run, on a compressed copy, checks that the
copy still works, and, with observers on, calibrates it.

A watched step leaves no trace: eval mode (no BatchNorm statistics move, no dropout), no gradients, no
optimizer, ``self.log`` silenced, and the random number generators, buffers and metric states restored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.hooks import DataHooks
from torch import nn
from torchmetrics import Metric

from lightning_compress import compat, sharding

Call = tuple[tuple, dict]
"""The positional and keyword arguments of one call of a module."""


class TrainingStepError(ValueError):
    """``training_step`` could not run on a real batch, so no module's inputs could be observed."""


def training_batches(trainer: L.Trainer, pl_module: L.LightningModule, count: int) -> list[Any]:
    """The first ``count`` training batches (fewer if the data runs out), passed through the batch-transfer
    hooks that Lightning would apply and moved to the module's device."""
    batches = []
    for batch in islice(compat.training_dataloader(trainer), count):
        batches.append(transfer_batch(trainer, pl_module, batch))
    return batches


def transfer_batch(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> Any:
    """``batch`` through Lightning's batch hooks in its order, each taken from the datamodule when it overrides it,
    onto the module's device."""
    datamodule = trainer.datamodule

    def hook(name: str):
        overridden = datamodule is not None and getattr(type(datamodule), name) is not getattr(DataHooks, name)
        return getattr(datamodule if overridden else pl_module, name)

    batch = hook("on_before_batch_transfer")(batch, 0)
    batch = hook("transfer_batch_to_device")(batch, pl_module.device, 0)
    return hook("on_after_batch_transfer")(batch, 0)


def watch_training_step(
    module: L.LightningModule,
    batches: Sequence[Any],
    names: Iterable[str] = (),
    calls_per_module: int = 1,
    restore_buffers: bool = True,
    inference_fastpath: bool = True,
    fall_back_to_forward: bool = True,
) -> dict[str, list[Call]]:
    """Run ``module.training_step`` on each batch without leaving a trace, recording up to
    ``calls_per_module`` calls of ``module`` itself (key ``""``) and of every submodule under ``names``.
    ``restore_buffers=False`` keeps what the steps wrote into buffers: observers calibrating their ranges.
    ``inference_fastpath=False`` turns off torch's fused inference path of transformer layers, which reads
    ``linear1.weight`` and the like directly and so cannot run while those layers are being calibrated.

    Falls back to calling ``forward`` with ``example_input_array`` (or the first tensor of the batch) when
    ``training_step`` cannot run yet (unless ``fall_back_to_forward=False``); raises ``TrainingStepError``
    if that fails too.
    """
    watched = {""} | {
        f"{name}.{child}" if child else name for name in names for child, _ in module.get_submodule(name).named_modules()
    }
    calls: dict[str, list[Call]] = {}
    handles = []
    for name in sorted(watched):
        target = module.get_submodule(name) if name else module

        def record(_module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            recorded = calls.setdefault(name, [])
            if len(recorded) < calls_per_module:
                recorded.append((_detached(args), _detached(kwargs)))

        handles.append(target.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with _without_a_trace(module, restore_buffers), _transformer_fastpath(inference_fastpath):
            try:
                for batch_index, batch in enumerate(batches):
                    module.training_step(_fresh(batch), batch_index)
            except Exception as error:  # noqa: BLE001 - a user's step can fail in any way; say which, once
                # A step may need what the module builds in its own setup(), which runs after the callbacks'
                # (distillation's hint adapters): then call forward, as example_input_array or the batch's input.
                calls.clear()
                try:
                    if not fall_back_to_forward:
                        raise error
                    _call_forward(module, batches[0])
                except Exception:  # noqa: BLE001 - report the step's failure: that is the one the user wrote
                    raise TrainingStepError(
                        f"{type(module).__name__}.training_step failed on a real training batch "
                        f"({type(error).__name__}: {first_line(error)}); the compression callbacks run it to see "
                        "how your networks are called. Fix the step, or set `example_input_array` for forward()."
                    ) from error
    finally:
        for handle in handles:
            handle.remove()
    return calls


def outermost_calls(module: L.LightningModule, batches: Sequence[Any]) -> list[list[tuple[str, Call]]]:
    """For each batch, the calls ``training_step`` made itself, in order: of ``module`` (name ``""``) or of its
    submodules, not the calls those made inside (watched without a trace, as ``watch_training_step``).
    Raises ``TrainingStepError`` if the step fails."""
    per_batch: list[list[tuple[str, Call]]] = []
    depth = 0
    handles = []

    def enter(name: str, args: tuple, kwargs: dict) -> None:
        nonlocal depth
        if depth == 0:
            per_batch[-1].append((name, (_detached(args), _detached(kwargs))))
        depth += 1

    def leave(*_: Any) -> None:
        nonlocal depth
        depth -= 1

    for name, submodule in module.named_modules():
        handles.append(
            submodule.register_forward_pre_hook(lambda _, args, kwargs, name=name: enter(name, args, kwargs), with_kwargs=True)
        )
        handles.append(submodule.register_forward_hook(leave, always_call=True))
    try:
        with _without_a_trace(module):
            for batch_index, batch in enumerate(batches):
                per_batch.append([])
                depth = 0
                try:
                    module.training_step(_fresh(batch), batch_index)
                except Exception as error:  # noqa: BLE001 - a user's step can fail in any way; say which, once
                    raise TrainingStepError(
                        f"{type(module).__name__}.training_step failed on a batch ({type(error).__name__}: {first_line(error)})"
                    ) from error
    finally:
        for handle in handles:
            handle.remove()
    return per_batch


def first_calls(module: L.LightningModule, batches: Sequence[Any], names: Iterable[str] = ()) -> dict[str, Call]:
    """``watch_training_step``, keeping the first call of ``module`` (key ``""``) and of each watched submodule."""
    return {name: calls[0] for name, calls in watch_training_step(module, batches, names).items()}


def runs(module: L.LightningModule, batches: Sequence[Any]) -> str | None:
    """``None`` if ``module.training_step`` runs on ``batches`` (watched, without a trace), else why not. The
    batches go to the module's device first: a compressed copy lives on the CPU, the trained module may not."""
    device = _device_of(module)
    try:
        watch_training_step(module, [on_device(batch, device) for batch in batches], fall_back_to_forward=False)
    except TrainingStepError as error:
        return first_line(error.__cause__ or error)
    return None


def keep_what_runs(module: L.LightningModule, replacements: dict[str, nn.Module], batches: Sequence[Any]) -> dict[str, str]:
    """Swap each replacement into ``module`` in turn, keeping it only if ``training_step`` still runs.

    A compressed layer can run alone and still break its parent (``nn.TransformerEncoderLayer``'s inference
    fast path reads ``linear1.weight`` directly). Returns the names left as they were, with why.
    """
    refused = {}
    for name, replacement in replacements.items():
        original = module.get_submodule(name)
        module.set_submodule(name, replacement)
        failure = runs(module, batches)
        if failure:
            module.set_submodule(name, original)
            refused[name] = failure
    return refused


def call_record(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The shapes and dtypes of a call's tensors (and its other values), small enough for a checkpoint: what
    rebuilding a traced structure (an exported graph, a network with channels removed) needs before any data."""
    return {"args": _record(tuple(args)), "kwargs": _record(dict(kwargs))}


def replayed_call(record: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Arguments of the recorded shapes and dtypes (zeros), for tracing; values are not kept."""
    return _replay(record["args"]), _replay(record["kwargs"])


def _record(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, list | tuple):
        return [_record(item) for item in value]
    if isinstance(value, dict):
        return {"dict": {key: _record(item) for key, item in value.items()}}
    return {"value": value}


def _replay(record: Any) -> Any:
    if isinstance(record, list):
        return tuple(_replay(item) for item in record)
    if "shape" in record:
        return torch.zeros(record["shape"], dtype=getattr(torch, record["dtype"]))
    if "dict" in record:
        return {key: _replay(item) for key, item in record["dict"].items()}
    return record["value"]


def same_outputs(expected: Any, actual: Any) -> bool:
    """Whether two outputs of a module hold the same tensors (however nested in tuples, lists and dicts), in
    number, shape and value up to float tolerance: how a traced or shrunken copy is checked against the original
    (compared on the CPU, where a compressed copy lives)."""
    wanted, got = _tensors_in(expected), _tensors_in(actual)
    return len(wanted) == len(got) and all(
        want.shape == have.shape and torch.allclose(want.cpu().float(), have.cpu().float(), rtol=1e-3, atol=1e-4)
        for want, have in zip(wanted, got, strict=True)
    )


def first_tensor(batch: Any) -> torch.Tensor:
    """The model input of an ``(input, target)`` batch, for the image-classification helpers of the app and
    distillation, which take one tensor."""
    item = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"cannot tell the model input in a batch of type {type(batch).__name__}.")
    return item


def example_input(trainer: L.Trainer, pl_module: L.LightningModule, size: int = 2) -> Any:
    """``pl_module.example_input_array`` if set, else the first ``size`` samples of a training batch."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    return first_tensor(training_batches(trainer, pl_module, 1)[0])[:size]


# ---------------------------------------------------------------------- helpers of this module


@contextmanager
def _without_a_trace(module: L.LightningModule, restore_buffers: bool = True) -> Iterator[None]:
    was_training = module.training
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()} if restore_buffers else {}
    metrics = {name: copy.deepcopy(metric.metric_state) for name, metric in module.named_modules() if isinstance(metric, Metric)}
    devices = [module.device.index or 0] if module.device.type == "cuda" else []
    module.log = module.log_dict = _ignore  # an unregistered result collection would raise
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        del module.log, module.log_dict
        module.train(was_training)
        sharding.reshard(module)  # FSDP2 keeps a root it ran forward whole until a backward that never comes here
        named_buffers = dict(module.named_buffers())
        for name, value in buffers.items():
            if name in named_buffers and named_buffers[name].shape == value.shape:
                named_buffers[name].copy_(value)
        for name, state in metrics.items():
            metric = module.get_submodule(name)
            for attribute, value in state.items():
                setattr(metric, attribute, value)


def _call_forward(module: L.LightningModule, batch: Any) -> None:
    example = module.example_input_array if module.example_input_array is not None else first_tensor(batch)
    if isinstance(example, dict):
        module(**example)
    else:
        module(*(example if isinstance(example, tuple) else (example,)))


@contextmanager
def _transformer_fastpath(enabled: bool) -> Iterator[None]:
    was_enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled and was_enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was_enabled)


def on_cpu(value: Any) -> Any:
    """``value`` (a call's arguments, a batch) with every tensor in it on the CPU: what conversion, exports
    and the report work with, whatever device the module trains on."""
    return _map_tensors(value, torch.Tensor.cpu)


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device``."""
    return _map_tensors(value, lambda tensor: tensor.to(device))


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with new tuples, lists (named tuples included) and dicts, and ``function`` applied to its tensors."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_map_tensors(item, function) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _fresh(batch: Any) -> Any:
    """A copy of the batch's containers (not of its tensors): a step may pop from its batch."""
    return _map_tensors(batch, lambda tensor: tensor)


def _detached(value: Any) -> Any:
    return _map_tensors(value, torch.Tensor.detach)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _tensors_in(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [tensor for value in output.values() for tensor in _tensors_in(value)]
    if isinstance(output, list | tuple):
        return [tensor for value in output for tensor in _tensors_in(value)]
    return []


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """The first line of an error's message (at most ``limit`` characters), or its type when it has none: how
    a failure is told in one line."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
