"""Sparsity schedules: the target sparsity after ``step`` optimizer steps.

``cubic`` is Zhu and Gupta's gradual magnitude pruning (2017): prune fast while the network has many
redundant weights, then slow down as it has fewer left to lose,

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3      for t0 <= t <= t1,

held at ``s_f`` afterwards. ``linear`` ramps at a constant rate; ``constant`` prunes to ``s_f`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_compress.validation import check_integer, check_number

SCHEDULES = ("cubic", "linear", "constant")


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity between ``start_step`` and ``end_step``, updated every ``update_every`` steps.

    Args:
        kind: ``cubic``, ``linear`` or ``constant``.
        initial_sparsity: sparsity at ``start_step``, in [0, 1).
        final_sparsity: sparsity from ``end_step`` on, in [0, 1).
        start_step: first optimizer step at which pruning happens.
        end_step: step at which ``final_sparsity`` is reached (> ``start_step``).
        update_every: steps between mask updates.
    """

    kind: str
    initial_sparsity: float
    final_sparsity: float
    start_step: int
    end_step: int
    update_every: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r} is unknown: allowed values are {list(SCHEDULES)}.")
        for name in ("initial_sparsity", "final_sparsity"):
            check_number(name, getattr(self, name), 0.0, 1.0, high_open=True)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity} is above final_sparsity={self.final_sparsity}: "
                "pruning only ever removes weights."
            )
        check_integer("update_every", self.update_every, minimum=1)
        check_integer("start_step", self.start_step, minimum=0)
        check_integer("end_step", self.end_step)
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step={self.end_step} must come after start_step={self.start_step}.")

    def target(self, step: int) -> float:
        """Sparsity the weights should have once step ``step`` has been reached (0 before the start)."""
        if step < self.start_step:
            return 0.0
        if self.kind == "constant" or step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "linear":
            return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * progress
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Masks change at the start, every ``update_every`` steps, and at the end of the ramp."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.update_every == 0 or step == self.end_step
