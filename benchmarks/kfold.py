"""k-fold evaluation for the quality benchmarks: every digits image is a test image once per seed.

A fixed 270-image test split resolves 0.37 points per image, too coarse to tell methods apart. With
``DigitsDataModule(folds=k, fold=i)`` each of the k runs tests on a different stratified part, so the
predictions of the k models cover all 1,797 images, each made by a model that never saw it.

    from kfold import kfold_accuracy
    result = kfold_accuracy(train_and_predict, folds=5, seeds=[0, 1, 2])

``train_and_predict(datamodule, seed)`` trains on the datamodule's train split and returns, for each arm
(method) it compares, the predicted classes of ``datamodule.test_set`` in order.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

import torch

from lightning_compress.app.data import DigitsDataModule

TrainAndPredict = Callable[[DigitsDataModule, int], Mapping[str, torch.Tensor]]


def kfold_accuracy(train_and_predict: TrainAndPredict, folds: int = 5, seeds: list[int] | None = None, **data_options) -> dict:
    """Accuracy of each arm over all images, per seed (the folds' split is shuffled by the seed too), with the
    mean and the spread over seeds; ``data_options`` go to every ``DigitsDataModule``."""
    seeds = [0, 1, 2] if seeds is None else seeds
    per_seed: dict[str, list[float]] = {}
    for seed in seeds:
        correct: dict[str, int] = {}
        seen = torch.zeros(0, dtype=torch.long)
        for fold in range(folds):
            datamodule = DigitsDataModule(folds=folds, fold=fold, split_seed=seed, **data_options)
            datamodule.setup()
            labels = datamodule.test_set.tensors[1]
            for arm, predicted in train_and_predict(datamodule, seed).items():
                correct[arm] = correct.get(arm, 0) + int((predicted.cpu() == labels).sum())
            seen = torch.cat([seen, datamodule.test_indices])
        if len(seen) != len(set(seen.tolist())):  # a fold tested an image twice: the split is not a partition
            raise RuntimeError(f"k-fold with seed {seed} tested some images more than once.")
        for arm, hits in correct.items():
            per_seed.setdefault(arm, []).append(hits / len(seen))
    return {
        "folds": folds,
        "seeds": seeds,
        "images": len(seen),
        "arms": {
            arm: {
                "per_seed": values,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
            for arm, values in per_seed.items()
        },
    }


def predicted_classes(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class ``model`` predicts for each of ``images``, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(batch).argmax(1) for batch in images.split(256)])


def fold_accuracies(predictions: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Each arm's accuracy on one fold, rounded for a progress line."""
    return {arm: round(float((predicted.cpu() == labels).float().mean()), 4) for arm, predicted in predictions.items()}


def paired_difference(result: dict, arm: str, baseline: str) -> dict:
    """``arm`` minus ``baseline`` in points, seed by seed (both arms saw the same folds of each seed), with the
    mean, the standard deviation over seeds and the standard error of the mean."""
    pairs = zip(result["arms"][arm]["per_seed"], result["arms"][baseline]["per_seed"], strict=True)
    return over_seeds([100 * (a - b) for a, b in pairs])


def over_seeds(values: list[float]) -> dict:
    """One value per seed, with their mean, standard deviation and the standard error of the mean."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "per_seed": values,
        "mean": statistics.mean(values),
        "std": spread,
        "standard_error": spread / len(values) ** 0.5,
    }
