"""reid-deploy: person re-identification from spec to deployment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reid_deploy.inference.base import FeatureExtractor

__version__ = "0.1.0"


def load_extractor(path: str | Path, key: str | None = None, device: str = "auto", precision: str | None = None,
                   compile: bool = False) -> FeatureExtractor:
    """A feature extractor for any model file (``.pth``, ``.onnx``, ``.onnx.enc``, ``.engine``).

    ``extractor.embed(crops)`` turns person crops (uint8 HxWx3 RGB arrays of any size, PIL images or image
    paths) into unit float32 features [N, D]. ``key`` decrypts ``.onnx.enc`` models (in memory only);
    ``device`` is ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; ``precision`` (``.pth`` only) is
    ``fp32``, ``fp16`` or ``bf16``, by default fp16 on CUDA and fp32 on CPU; ``compile`` runs a ``.pth``
    model through ``torch.compile`` on CUDA. torch and the runtimes are imported on the first call only.
    """
    from reid_deploy.inference.extractors import load_extractor as load

    return load(path, key, device, precision, compile)
