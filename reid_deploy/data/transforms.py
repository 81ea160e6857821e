"""Preprocessing, in one place for every backend: image file -> normalised float32 CHW array.

A model input is the image converted to RGB (any source mode: grayscale, CMYK, RGBA, 16-bit), resized
to input_height x input_width with bilinear filtering, scaled to [0, 1], then normalised per channel
with (x - pixel_mean) / pixel_std. Exported ONNX models and TensorRT engines expect exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reid_deploy.errors import DataError


def open_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open any readable image as RGB (or L for 1-channel models); DataError when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float: rescale to 8-bit
        arr = np.asarray(img, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(base, rgba)
    return img.convert("RGB" if channels == 3 else "L")


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
        return img.resize((self.width, self.height), Image.BILINEAR)

    def normalize(self, img: Image.Image) -> np.ndarray:
        """A resized PIL image -> float32 CHW, normalised."""
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.resize(img))

    def load(self, path: str | Path) -> np.ndarray:
        return self(open_image(path, self.channels))

    def load_batch(self, paths: Sequence[str | Path]) -> np.ndarray:
        return np.stack([self.load(p) for p in paths]) if paths else \
            np.zeros((0, self.channels, self.height, self.width), np.float32)


@dataclass(frozen=True)
class TrainTransform:
    """Training augmentation around ``Preprocess``: resize, flip, pad + random crop, normalise, erase.

    Horizontal flip with probability ``flip_prob``; ``padding`` zero pixels on each side then a random
    crop back to the input size (0: neither); random erasing (torchvision, Zhong et al.: area 2-33 %,
    aspect 0.3-3.3) with probability ``erase_prob`` fills a rectangle with standard-normal noise in the
    normalised space. Randomness comes from torch's RNG (per DataLoader worker).
    """

    preprocess: Preprocess
    padding: int
    flip_prob: float
    erase_prob: float

    @classmethod
    def from_spec(cls, spec) -> TrainTransform:
        data = spec.dataset
        return cls(Preprocess.from_spec(spec), data.padding, data.prob, data.re_prob)

    def __call__(self, img: Image.Image):
        import torch
        import torchvision.transforms.functional as TF
        from torchvision.transforms import RandomCrop, RandomErasing

        img = self.preprocess.resize(img)
        if torch.rand(()) < self.flip_prob:
            img = TF.hflip(img)
        if self.padding:
            img = TF.pad(img, self.padding, fill=0)
            top, left, h, w = RandomCrop.get_params(img, (self.preprocess.height, self.preprocess.width))
            img = TF.crop(img, top, left, h, w)
        tensor = torch.from_numpy(self.preprocess.normalize(img))
        if self.erase_prob > 0:
            tensor = RandomErasing(p=self.erase_prob, value="random")(tensor)
        return tensor
