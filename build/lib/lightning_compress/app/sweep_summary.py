"""Summarise a sweep: accuracy against size and latency for every job, with the Pareto front marked.

    python -m lightning_compress.app.sweep_summary multirun/prune/<time> [--model fp32] [--wandb]

Reads each job's ``report.json`` and ``.hydra/overrides.yaml`` under the sweep folder, writes
``sweep_summary.png`` and ``sweep_summary.md`` there, and with ``--wandb`` logs both to a W&B run of
its own (offline unless WANDB_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class SweepPoint:
    job: str
    overrides: str
    accuracy: float
    size_bytes: int
    nonzero_parameters: int
    latency_ms: float


def collect(sweep_dir: Path, model: str) -> list[SweepPoint]:
    """One point per job: the report row ``model`` of each job folder that finished."""
    points = []
    for report_path in sorted(sweep_dir.glob("*/report.json")):
        job = report_path.parent
        row = next((r for r in json.loads(report_path.read_text())["rows"] if r["name"] == model), None)
        if row is None:
            continue
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        points.append(
            SweepPoint(
                job.name, " ".join(overrides), row["accuracy"], row["size_bytes"], row["nonzero_parameters"], row["latency_ms"]
            )
        )
    return points


def pareto_front(points: list[SweepPoint], cost: str) -> set[str]:
    """Jobs no other job beats on both accuracy (higher) and ``cost`` (lower)."""
    front = set()
    for point in points:
        dominated = any(
            other.accuracy >= point.accuracy
            and getattr(other, cost) <= getattr(point, cost)
            and (other.accuracy > point.accuracy or getattr(other, cost) < getattr(point, cost))
            for other in points
        )
        if not dominated:
            front.add(point.job)
    return front


def write(points: list[SweepPoint], sweep_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, cost, label in (
        (axes[0], "nonzero_parameters", "non-zero parameters"),
        (axes[1], "latency_ms", "batch-1 latency (ms)"),
    ):
        front = pareto_front(points, cost)
        for point in points:
            on_front = point.job in front
            axis.scatter(
                getattr(point, cost),
                100 * point.accuracy,
                color="tab:red" if on_front else "tab:blue",
                marker="*" if on_front else "o",
                s=80 if on_front else 30,
            )
            axis.annotate(point.job, (getattr(point, cost), 100 * point.accuracy), fontsize=7)
        ordered = sorted((p for p in points if p.job in front), key=lambda p: getattr(p, cost))
        axis.plot([getattr(p, cost) for p in ordered], [100 * p.accuracy for p in ordered], "r--", linewidth=1)
        axis.set(xlabel=label, ylabel="test accuracy (%)", title=f"accuracy vs {label} (red: Pareto front)")
    figure.tight_layout()
    png = sweep_dir / "sweep_summary.png"
    figure.savefig(png, dpi=100)
    plt.close(figure)
    size_front, latency_front = pareto_front(points, "nonzero_parameters"), pareto_front(points, "latency_ms")
    lines = [
        "| job | overrides | test acc | non-zero params | size KiB | latency ms | Pareto (size) | Pareto (latency) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.job} | {p.overrides} | {100 * p.accuracy:.2f}% | {p.nonzero_parameters:,} | "
            f"{p.size_bytes / 1024:.1f} | {p.latency_ms:.3f} | {'yes' if p.job in size_front else ''} | "
            f"{'yes' if p.job in latency_front else ''} |"
        )
    table = sweep_dir / "sweep_summary.md"
    table.write_text("\n".join(lines) + "\n")
    return png, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder holding one sub-folder per job")
    parser.add_argument("--model", default="fp32", help="report row to compare (fp32, int8, channels removed, ...)")
    parser.add_argument("--wandb", action="store_true", help="log the plot and table to a W&B run")
    args = parser.parse_args(argv)
    points = collect(args.sweep_dir, args.model)
    if not points:
        raise SystemExit(f"error: no job under {args.sweep_dir} has a report row named {args.model!r}.")
    png, table = write(points, args.sweep_dir)
    print(table.read_text())
    if args.wandb:
        import wandb

        run = wandb.init(
            project="lightning-compress", group=args.sweep_dir.parent.name, job_type="sweep-summary", dir=str(args.sweep_dir)
        )
        columns = ["job", "overrides", "accuracy", "nonzero_parameters", "size_bytes", "latency_ms"]
        run.log(
            {
                "sweep/pareto": wandb.Image(str(png)),
                "sweep/table": wandb.Table(columns=columns, data=[[getattr(p, c) for c in columns] for p in points]),
            }
        )
        run.finish()


if __name__ == "__main__":
    main()
