"""One feature-extractor interface for every model file: PyTorch, ONNX Runtime, TensorRT.

``load_extractor(path)`` picks the backend from the file name. Every extractor takes a batch that
``Preprocess`` made (float32 NCHW, normalised) and returns L2-normalised float32 features [N, feat_dim].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

import numpy as np

from reid_deploy.data.transforms import Preprocess
from reid_deploy.errors import ModelFileError


class FeatureExtractor(ABC):
    backend: str
    preprocess: Preprocess
    feat_dim: int
    max_batch: Optional[int] = None  # largest batch one call may take (TensorRT profile); None: any

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Features of one batch that fits ``max_batch``."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.feat_dim), np.float32)
        step = self.max_batch or len(batch)
        parts = [self.run(np.ascontiguousarray(batch[i:i + step], dtype=np.float32))
                 for i in range(0, len(batch), step)]
        return np.concatenate(parts).astype(np.float32, copy=False)


class TorchExtractor(FeatureExtractor):
    """A PyTorch ReidModel (in memory, or rebuilt from a checkpoint with ``from_file``)."""

    backend = "pytorch"

    def __init__(self, model, spec, device: str = "auto"):
        import torch

        self._torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.model = model.to(self.device)
        self.spec = spec
        self.preprocess = Preprocess.from_spec(spec)
        self.feat_dim = spec.model.feat_dim

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto") -> "TorchExtractor":
        from reid_deploy.model.checkpoint import load_model_file

        model, spec = load_model_file(path)
        return cls(model, spec, device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._torch.inference_mode():
                return self.model(self._torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
        finally:
            self.model.train(was_training)


def load_extractor(path: str | Path, key: Optional[str] = None, device: str = "auto") -> FeatureExtractor:
    """The extractor for a model file: ``.pth``, ``.onnx``, ``.onnx.enc`` or ``.engine``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    name = path.name.lower()
    if name.endswith((".pth", ".pt")):
        return TorchExtractor.from_file(path, device)
    raise ModelFileError(f"unsupported model file {path}: expected .pth, .onnx, .onnx.enc or .engine")
