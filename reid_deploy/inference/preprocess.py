"""Model-input preprocessing, in one place for every backend: image file -> normalised float32 CHW array.

A model input is the image converted to RGB (any source mode: grayscale, CMYK, RGBA, 16-bit), resized
to input_height x input_width with bilinear filtering, scaled to [0, 1], then normalised per channel
with (x - pixel_mean) / pixel_std. Exported ONNX models and TensorRT engines expect exactly this.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from reid_deploy.data.transforms import normalize_image, open_image, resize_image
from reid_deploy.errors import DataError

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
        return (batch.float() / 255.0 - _channel_values(self.mean, batch.device)) / \
            _channel_values(self.std, batch.device)

    def load_uint8(self, path: str | Path) -> np.ndarray:
        """An image file -> resized uint8 CHW; DataError naming the file when it cannot be read."""
        return self.to_uint8(open_image(path, self.channels))

    def crop_to_uint8(self, crop: np.ndarray | Image.Image | str | Path) -> np.ndarray:
        """A person crop -> resized uint8 CHW, as ``load_uint8`` makes from the same image saved to a file.

        ``crop``: a uint8 HxWx3 RGB (or HxW grayscale) array of any size, a PIL image or an image path;
        anything else raises DataError.
        """
        if isinstance(crop, (str, Path)):
            return self.load_uint8(crop)
        if isinstance(crop, np.ndarray):
            if crop.dtype != np.uint8 or not (crop.ndim == 2 or (crop.ndim == 3 and crop.shape[2] == 3)) \
                    or 0 in crop.shape:
                raise DataError(f"a crop array must be uint8 HxWx3 RGB or HxW, got {crop.dtype} {crop.shape}")
            crop = Image.fromarray(np.ascontiguousarray(crop))
        if not isinstance(crop, Image.Image):
            raise DataError(f"a crop must be a uint8 array, a PIL image or a path, got {type(crop).__name__}")
        if crop.mode not in ("RGB", "L"):  # alpha, 16-bit, CMYK, palette: the file path's conversions exactly
            crop = _reopened(crop)
        return self.to_uint8(crop.convert("RGB" if self.channels == 3 else "L"))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.resize(img))

    def load(self, path: str | Path) -> np.ndarray:
        return self(open_image(path, self.channels))

    def load_batch(self, paths: Sequence[str | Path]) -> np.ndarray:
        return np.stack([self.load(p) for p in paths]) if paths else \
            np.zeros((0, self.channels, self.height, self.width), np.float32)


@functools.lru_cache(maxsize=32)
def _channel_values(values: tuple[float, ...], device: "torch.device") -> "torch.Tensor":
    """Per-channel float32 values as a [1, C, 1, 1] tensor on ``device``, made once per device: building it
    per batch would copy from the host and wait for everything queued on a GPU."""
    import torch

    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, len(values), 1, 1)


def _reopened(img: Image.Image) -> Image.Image:
    """An in-memory image of an unusual mode, read back through ``open_image`` (lossless TIFF in memory)."""
    buffer = io.BytesIO()
    ImageOps.exif_transpose(img).save(buffer, format="TIFF")
    buffer.seek(0)
    return open_image(buffer)
