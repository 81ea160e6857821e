"""Where deployment artefacts go and how they are written: ``model.onnx[.enc]`` and its tagged siblings
(``model.int8.onnx``, ``model.qdq.onnx``), engines under ``<results>/build_engine/engines/``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from reid_deploy.crypto import encrypt_to_file
from reid_deploy.files import write_bytes_atomic


def artefact_path(target: Path, tag: str) -> Path:
    """``model.onnx[.enc]`` -> ``model.<tag>.onnx[.enc]``."""
    name = target.name
    stem, sep, rest = name.partition(".onnx")
    return target.with_name(f"{stem}.{tag}{sep}{rest}" if sep else f"{name}.{tag}")


def write_model(model_bytes: bytes, path: Path, key: str | None) -> None:
    """Atomically, encrypted when a key is given."""
    if key:
        encrypt_to_file(model_bytes, path, key)
    else:
        write_bytes_atomic(path, model_bytes)


def model_name(source: Path) -> str:
    """``model.onnx.enc`` -> ``model``."""
    return re.sub(r"(\.onnx)?(\.enc)?$", "", source.name, flags=re.IGNORECASE)


def default_engine_path(spec: Any, source: Path, gpu_tag: str) -> Path:
    """Where an engine built from ``source`` on ``gpu_tag`` goes when build_engine.engine_file is not set."""
    return spec.command_dir("build_engine") / "engines" / \
        f"{model_name(source)}.{gpu_tag}.{spec.build_engine.precision}.engine"
