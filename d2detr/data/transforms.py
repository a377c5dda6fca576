"""Augmentations that Detectron2 lacks: exact rotations by multiples of 90 degrees.

Detectron2's ``RandomRotation`` resamples with ``cv2.warpAffine`` about the pixel-centre
grid, so even a 90-degree turn shifts the image by up to a pixel against its boxes and blends
the border; for aerial tiles (no "up") a 90-degree turn is a free, lossless view of the data,
which these transforms give exactly (``np.rot90``: pixels are only moved).
"""
from typing import Sequence

import numpy as np
from detectron2.data import transforms as T

__all__ = ["Rot90Transform", "RandomRot90"]


class Rot90Transform(T.Transform):
    """Rotates an ``h x w`` image by ``k`` x 90 degrees counter-clockwise (as ``np.rot90``), with
    its boxes, polygons and masks; the output is ``w x h`` for odd ``k``."""

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        if int(k) != k:
            raise ValueError(f"Rot90Transform: k must be an integer number of quarter turns, got {k!r}")
        if h <= 0 or w <= 0:
            raise ValueError(f"Rot90Transform: image size must be positive, got h={h}, w={w}")
        self._set_attributes(dict(h=int(h), w=int(w), k=int(k) % 4))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"Rot90Transform was made for a {self.h}x{self.w} image, got one of shape {tuple(img.shape)}"
            )
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        # Continuous (x, y) on [0, w] x [0, h]; pixel (row r, col c) has its centre at (c + .5, r + .5).
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> T.Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, -self.k)


class RandomRot90(T.Augmentation):
    """Rotates by a quarter-turn count drawn uniformly from ``quarter_turns`` (default 0-3).

    With Detectron2's horizontal and vertical ``RandomFlip`` this gives all 8 symmetries of the
    square (flips alone give 4: none, h, v and their product, a half turn).
    """

    def __init__(self, quarter_turns: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        quarter_turns = tuple(quarter_turns)
        if not quarter_turns or any(int(k) != k for k in quarter_turns):
            raise ValueError(f"RandomRot90: quarter_turns must be a non-empty list of integers, got {quarter_turns!r}")
        self._init(dict(quarter_turns=tuple(int(k) % 4 for k in quarter_turns)))

    def get_transform(self, image: np.ndarray) -> T.Transform:
        k = self.quarter_turns[np.random.randint(len(self.quarter_turns))]
        if k == 0:
            return T.NoOpTransform()
        h, w = image.shape[:2]
        return Rot90Transform(h, w, k)
