"""Checkpoint files: one dict holding the weights, the resolved spec (key redacted) and training state.

Loading always uses ``torch.load(weights_only=True)``: a file that would need to run code is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from reid_deploy.errors import ModelFileError, missing_file
from reid_deploy.files import atomic_path
from reid_deploy.model.reid_model import CHECKPOINT_FORMAT, ReidModel, build_model
from reid_deploy.spec import Spec, spec_from_yaml, to_yaml


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: Spec, **state: Any) -> None:
    """Write atomically: ``{"format", "model": state_dict, "spec": yaml, **state}``."""
    payload = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "spec": to_yaml(spec), **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict; ModelFileError for a missing, damaged or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "checkpoint"))
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise ModelFileError(f"refusing to load {path}: it is not a plain weights file ({first[:160]})") from None
    except Exception as exc:  # untrusted bytes: any failure to parse them means "not a checkpoint"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a checkpoint (expected a dict, got {type(data).__name__})")
    return data


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[ReidModel, Spec]:
    """Rebuild the model of a reid-deploy checkpoint from its embedded spec and load its weights."""
    data = read_checkpoint(path)
    if data.get("format") != CHECKPOINT_FORMAT or "spec" not in data or "model" not in data:
        raise ModelFileError(f"{path} is not a reid-deploy checkpoint (no embedded spec); train with "
                             f"'reid train' or load it through model.pretrain_choice=self")
    spec = spec_from_yaml(data["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        raise ModelFileError(f"weights in {path} do not fit its spec: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), spec
