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


def resize_image(img: Image.Image, height: int, width: int) -> Image.Image:
    """The model-input resize: bilinear to height x width."""
    return img.resize((width, height), Image.BILINEAR)


def normalize_image(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A resized PIL image -> float32 CHW, scaled to [0, 1] then ``(x - mean) / std`` per channel."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class TrainTransform:
    """Training augmentation: resize, flip, pad + random crop, normalise, erase.

    Horizontal flip with probability ``flip_prob``; ``padding`` zero pixels on each side then a random
    crop back to the input size (0: neither); random erasing (torchvision, Zhong et al.: area 2-33 %,
    aspect 0.3-3.3) with probability ``erase_prob`` fills a rectangle with standard-normal noise in the
    normalised space. Randomness comes from torch's RNG (per DataLoader worker).
    """

    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    flip_prob: float
    erase_prob: float

    @classmethod
    def from_spec(cls, spec) -> TrainTransform:
        data = spec.dataset
        return cls(spec.model.input_height, spec.model.input_width, tuple(data.pixel_mean),
                   tuple(data.pixel_std), data.padding, data.prob, data.re_prob)

    def __call__(self, img: Image.Image):
        import torch
        import torchvision.transforms.functional as TF
        from torchvision.transforms import RandomCrop, RandomErasing

        img = resize_image(img, self.height, self.width)
        if torch.rand(()) < self.flip_prob:
            img = TF.hflip(img)
        if self.padding:
            img = TF.pad(img, self.padding, fill=0)
            top, left, h, w = RandomCrop.get_params(img, (self.height, self.width))
            img = TF.crop(img, top, left, h, w)
        tensor = torch.from_numpy(normalize_image(img, self.mean, self.std))
        if self.erase_prob > 0:
            tensor = RandomErasing(p=self.erase_prob, value="random")(tensor)
        return tensor
