"""Image reading and the model-input steps, plus the training augmentation.

A model input is the image converted to RGB (any source mode: grayscale, CMYK, RGBA, 16-bit), resized
to input_height x input_width with bilinear filtering, scaled to [0, 1], then normalised per channel
with (x - pixel_mean) / pixel_std (``inference.Preprocess`` composes these steps for every backend).
Exported ONNX models and TensorRT engines expect exactly this.
"""

from __future__ import annotations

import math
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
    """The spec's training augmentation, split by where each part runs.

    ``geometry`` runs in the loader's worker processes on a resized uint8 CHW image: a horizontal flip with
    probability ``flip_prob``, then ``padding`` zero pixels on each side and a random crop back to the input
    size (0: neither). ``erase`` runs on the training device on a normalised float NCHW batch: random
    erasing as torchvision's ``RandomErasing(p=erase_prob, value="random")`` (Zhong et al.), drawn per image.
    """

    padding: int
    flip_prob: float
    erase_prob: float

    ERASE_AREA = (0.02, 0.33)  # fraction of the image
    ERASE_ASPECT = (0.3, 3.3)  # height / width, drawn log-uniformly
    ERASE_TRIES = 10  # draws until a rectangle fits; none fits: the image stays as it is

    @classmethod
    def from_spec(cls, spec) -> TrainTransform:
        data = spec.dataset
        return cls(data.padding, data.prob, data.re_prob)

    def geometry(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Flip, pad + random crop of one uint8 CHW image; the crop offset is uniform over the padded image."""
        _, height, width = image.shape
        if rng.random() < self.flip_prob:
            image = image[:, :, ::-1]
        if self.padding:
            pad = self.padding
            padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
            top, left = rng.integers(0, 2 * pad + 1, size=2)
            image = padded[:, top:top + height, left:left + width]
        return np.ascontiguousarray(image)

    def erase(self, batch):
        """Random erasing of a float NCHW batch on its own device, no host synchronisation.

        Per image, with probability ``erase_prob``: the first of ``ERASE_TRIES`` draws of an area (uniform
        over ``ERASE_AREA`` of the image) and aspect ratio (log-uniform over ``ERASE_ASPECT``) whose rounded
        height and width are smaller than the image's, at a uniform position, filled with standard-normal
        noise. Randomness comes from the device's torch generator.
        """
        import torch

        if self.erase_prob <= 0 or batch.numel() == 0:
            return batch
        count, _, height, width = batch.shape
        device = batch.device
        tries = (count, self.ERASE_TRIES)
        area = torch.empty(tries, device=device).uniform_(*self.ERASE_AREA) * (height * width)
        aspect = torch.empty(tries, device=device).uniform_(*map(math.log, self.ERASE_ASPECT)).exp_()
        tall = torch.round(torch.sqrt(area * aspect)).long()
        wide = torch.round(torch.sqrt(area / aspect)).long()
        fits = (tall < height) & (wide < width)
        first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits
        tall, wide = tall.gather(1, first).squeeze(1), wide.gather(1, first).squeeze(1)
        chosen = (torch.rand(count, device=device) < self.erase_prob) & fits.any(dim=1)
        top = torch.minimum((torch.rand(count, device=device) * (height - tall + 1)).long(), height - tall)
        left = torch.minimum((torch.rand(count, device=device) * (width - wide + 1)).long(), width - wide)
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + tall).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + wide).view(-1, 1, 1))
                  & chosen.view(-1, 1, 1))
        return torch.where(inside.unsqueeze(1), torch.randn_like(batch), batch)
