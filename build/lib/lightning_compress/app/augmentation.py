"""Random geometric jitter of whole training batches, after they reach their device.

Why it is here: a student distilled from a teacher learns most where the teacher has something to say
that the labels do not, and on the very images the teacher was trained on it says little more than the
label (it has memorized them). Jittered views are new inputs on which the teacher's soft outputs carry
real information; the student sees the same view as the teacher, so the targets stay consistent. It is
an ordinary regularizer for any model too.

The jitter is drawn from a generator seeded by the run's seed, the epoch and the batch index, not from
the global random state: a run resumed from a checkpoint sees exactly the views the uninterrupted run saw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_compress.validation import check_number


class RandomAffine:
    """Shift, rotate and scale each image of a batch by its own random amounts.

    Args:
        shift: largest translation, as a fraction of the image side (0.125 is one pixel of an 8x8 digit).
        degrees: largest rotation either way.
        scale: largest relative zoom either way (0.1: between 0.9x and 1.1x).
    """

    def __init__(self, shift: float = 0.125, degrees: float = 10.0, scale: float = 0.1) -> None:
        for name, value, upper in (("shift", shift, 1.0), ("degrees", degrees, 180.0), ("scale", scale, 1.0)):
            check_number(f"data.augment.{name}", value, 0.0, upper, high_open=True)
        self.shift = shift
        self.degrees = degrees
        self.scale = scale

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images`` (N, C, H, W) jittered; border pixels fill what moves into view."""
        count = images.shape[0]

        def uniform(limit: float) -> torch.Tensor:  # in [-limit, limit], drawn on the CPU for reproducibility
            return (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * limit

        angle = uniform(math.radians(self.degrees))
        zoom = 1 + uniform(self.scale)
        # affine_grid works in [-1, 1] coordinates, so a shift of a fraction f of the side is 2f.
        shift_x, shift_y = uniform(2 * self.shift), uniform(2 * self.shift)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomAffine(shift={self.shift}, degrees={self.degrees}, scale={self.scale})"
