"""Model-input preprocessing, in one place for every backend: image file -> normalised float32 CHW array.

A model input is the image converted to RGB (any source mode: grayscale, CMYK, RGBA, 16-bit), resized
to input_height x input_width with bilinear filtering, scaled to [0, 1], then normalised per channel
with (x - pixel_mean) / pixel_std. Exported ONNX models and TensorRT engines expect exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from reid_deploy.data.transforms import normalize_image, open_image, resize_image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocess:
    """Resize + normalise for one model input size; the same object serves every backend."""

    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_spec(cls, spec) -> Preprocess:
        return cls(spec.model.input_height, spec.model.input_width,
                   tuple(spec.dataset.pixel_mean), tuple(spec.dataset.pixel_std))

    def resize(self, img: Image.Image) -> Image.Image:
        return resize_image(img, self.height, self.width)

    def normalize(self, img: Image.Image) -> np.ndarray:
        """A resized PIL image -> float32 CHW, normalised."""
        return normalize_image(img, self.mean, self.std)

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """A decoded image -> resized uint8 CHW (what loader workers produce; normalised later on the device)."""
        arr = np.asarray(self.resize(img), dtype=np.uint8)
        return np.ascontiguousarray((arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1))

    def normalize_tensor(self, batch: "torch.Tensor") -> "torch.Tensor":
        """uint8 NCHW on any device -> float32 ``(x / 255 - mean) / std`` on that device (the same arithmetic
        as ``normalize``, so every backend sees the same numbers)."""
        import torch

        shape = (1, self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(shape)
        return (batch.float() / 255.0 - mean) / std

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.resize(img))

    def load(self, path: str | Path) -> np.ndarray:
        return self(open_image(path, self.channels))

    def load_batch(self, paths: Sequence[str | Path]) -> np.ndarray:
        return np.stack([self.load(p) for p in paths]) if paths else \
            np.zeros((0, self.channels, self.height, self.width), np.float32)
