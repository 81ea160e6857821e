"""The one interface every runtime implements: ``FeatureExtractor`` (its backends live in extractors.py
and tensorrt.py). See extractors.py for the normalisation, flip and precision rules."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reid_deploy.inference.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from PIL import Image

EMBED_BATCH = 128  # crops per forward in ``embed``


class FeatureExtractor(ABC):
    backend: str
    preprocess: Preprocess
    feat_dim: int
    device: torch.device  # where ``features`` takes its images and computes
    max_batch: int | None = None  # largest batch one forward may take (TensorRT profile); None: any

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Features of normalised float32 NCHW ``inputs`` on ``self.device`` (at most ``max_batch``)."""

    def features(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """uint8 NCHW ``images`` on ``self.device`` -> unit float32 features on it; on CUDA without waiting
        for the device. With ``flip``: the mean of the image's and its mirror's features, normalised again."""
        import torch

        with torch.inference_mode():
            inputs = self.preprocess.normalize_tensor(images)
            feats = self._forward_all(inputs).float()
            if flip:
                feats = feats + self._forward_all(inputs.flip(-1)).float()
            return torch.nn.functional.normalize(feats, dim=1)

    def embed(self, crops: Sequence[np.ndarray | Image.Image | str | Path], flip: bool = False) -> np.ndarray:
        """Unit float32 features [N, feat_dim] of person crops: uint8 HxWx3 RGB arrays of any size (mixed
        sizes are fine), PIL images or image paths. The same numbers as extraction from image files."""
        parts = [np.zeros((0, self.feat_dim), np.float32)]
        for start in range(0, len(crops), EMBED_BATCH):
            images = np.stack([self.preprocess.crop_to_uint8(c) for c in crops[start:start + EMBED_BATCH]])
            parts.append(self(images, flip))
        return np.concatenate(parts)

    def __call__(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Features of a numpy batch: uint8 images (normalised here, see ``features``), or float32 inputs
        that are already normalised (returned as the model gives them)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        if len(x) == 0:
            return np.zeros((0, self.feat_dim), np.float32)
        if x.dtype == torch.uint8:
            return self.features(x.to(self.device), flip).cpu().numpy()
        with torch.inference_mode():
            return self._forward_all(x.to(self.device, torch.float32)).float().cpu().numpy()

    def _forward_all(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch

        step = self.max_batch or len(inputs)
        if len(inputs) <= step:
            return self.forward(inputs)
        return torch.cat([self.forward(inputs[i:i + step]) for i in range(0, len(inputs), step)])
