"""INT8 models, two kinds because the two runtimes want different things.

* ``dynamic``: weights of the backbone's MatMuls stored as INT8, activations quantized on the fly
  (``onnxruntime.quantization.quantize_dynamic``). No calibration; the fast CPU artefact for ONNX Runtime
  (Swin: its linear layers are MatMuls; a ResNet has none, convolutions are not dynamically quantized).
* ``static``: Q/DQ ONNX calibrated on real images (``quantize_static``, QuantFormat.QDQ, symmetric
  INT8 activations and per-channel symmetric weights, as TensorRT's explicit quantization requires).
  TensorRT builds its int8 engine from it; ONNX Runtime on CPU runs it too (slower than FP32 there).

Both keep the final embedding layer in FP32 (see ``linear_layers``).

ONNX Runtime's quantizers read and write files: everything runs inside ``private_tmpdir`` (mode 0700,
also tempfile's default meanwhile, removed afterwards) and only bytes come out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reid_deploy.errors import DataError, ModelFileError, ReidError
from reid_deploy.inference.preprocess import Preprocess

CAL_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _memory_tmp(min_free: int = 2 << 30) -> str | None:
    """/dev/shm when it is writable and has ``min_free`` bytes free (containers often give it 64 MB)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stat.f_bavail * stat.f_frsize >= min_free and os.access("/dev/shm", os.W_OK) else None


@contextmanager
def private_tmpdir() -> Iterator[Path]:
    """A private (0700) temporary folder that is tempfile's default while open; removed on exit.

    Libraries that write temporary models (ONNX Runtime's quantizer and optimizer need file paths) then
    write them in here too. It lives in memory (/dev/shm) where the system has a large enough one, so
    plaintext models do not reach a disk; else in the default temporary folder.
    """
    path = Path(tempfile.mkdtemp(prefix="reid-private-", dir=_memory_tmp()))
    previous = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)


class NothingToQuantize(ModelFileError):
    """Dynamic INT8 would change nothing: the model has no MatMul layers besides its embedding."""


def linear_layers(model: Any) -> list[Any]:
    """MatMul/Gemm nodes that multiply by a constant weight, in graph (topological) order.

    The last one is the embedding layer, with the BNNeck folded into it by the exporter: its per-tensor
    quantized input (the pooled features, whose few outlier channels set the INT8 step) comes out divided
    by BatchNorm's small per-dimension deviations. On a trained Swin-T, quantizing that one layer alone
    takes the cosine to FP32 from 0.99 down to 0.75, so both INT8 kinds keep it in FP32 (one small GEMM per
    image, a negligible share of the compute).
    """
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm") and any(name in constants for name in node.input[1:])]


def quantize_dynamic_bytes(model: bytes) -> bytes:
    """Dynamic INT8 of the MatMul weights of an FP32 ONNX model, all but the embedding; bytes in, bytes out."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load_from_string(model)
    backbone = [node.name for node in linear_layers(proto)[:-1] if node.op_type == "MatMul"]
    if not backbone:
        raise NothingToQuantize("the model has no MatMul layers besides its embedding (a convolutional "
                                "backbone): dynamic INT8 would leave it FP32; run FP32 on CPU, or the static "
                                "Q/DQ model (export.int8=static) on TensorRT")
    with private_tmpdir() as tmp, quiet_library_logs(), library_step("dynamic INT8 (ONNX Runtime's quantize_dynamic)"):
        source, out = tmp / "fp32.onnx", tmp / "int8.onnx"
        source.write_bytes(model)  # a path, not the proto: ONNX Runtime 1.18 loses a proto's weights in its temp copy
        quantize_dynamic(source, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=backbone,
                         per_channel=True, weight_type=QuantType.QInt8)
        return out.read_bytes()


class ImageCalibrationReader:
    """Calibration batches of real images through ``Preprocess`` (ORT's CalibrationDataReader protocol).

    Every batch has the same size (the last is topped up with the first images): ORT's percentile and
    entropy calibrators stack the batches' activations and fail on a shorter last batch.
    """

    def __init__(self, preprocess: Preprocess, paths: Sequence[str | Path], batch_size: int,
                 input_name: str = "input"):
        paths = list(paths)
        size = min(batch_size, len(paths))
        padded = paths + paths[:-len(paths) % size]  # the images missing from a full last batch
        self._batches = [padded[i:i + size] for i in range(0, len(padded), size)]
        self._preprocess, self._input = preprocess, input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        batch = self._preprocess.load_batch(self._batches[self._next])
        self._next += 1
        return {self._input: batch}

    def rewind(self) -> None:
        self._next = 0


def calibration_images(folder: str | Path, count: int) -> list[Path]:
    """``count`` images spread evenly over a folder (sorted, so the choice is reproducible)."""
    from reid_deploy.data.market1501 import list_images

    images = list_images(folder)
    if not images:
        raise DataError(f"no calibration images in {folder}")
    if len(images) <= count:
        return images
    return [images[i] for i in np.linspace(0, len(images) - 1, count).round().astype(int)]


def quantize_static_bytes(model: bytes, preprocess: Preprocess, images: Sequence[str | Path],
                          batch_size: int, method: str = "percentile") -> bytes:
    """Static Q/DQ INT8 for TensorRT, calibrated on ``images``; bytes in, bytes out."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    with private_tmpdir() as tmp, quiet_library_logs(), library_step("static INT8 (ONNX Runtime's quantize_static)"):
        source, out = tmp / "fp32.onnx", tmp / "qdq.onnx"
        source.write_bytes(model)  # a path, not the proto: ONNX Runtime 1.18 loses a proto's weights in its temp copy
        embedding = [node.name for node in linear_layers(onnx.load_from_string(model))[-1:]]
        quantize_static(source, out, Reader(preprocess, images, batch_size),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=embedding,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, CAL_METHODS[method]),
                        # biases stay float: TensorRT's parser takes only INT8/FP8 DequantizeLinear inputs
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
        return out.read_bytes()


@dataclass
class Closeness:
    """How close INT8 features are to FP32 ones (cosine per image)."""

    min_cosine: float
    mean_cosine: float

    def as_dict(self) -> dict[str, float]:
        return {"min_cosine": round(self.min_cosine, 6), "mean_cosine": round(self.mean_cosine, 6)}


def closeness(reference: np.ndarray, other: np.ndarray) -> Closeness:
    """Cosine similarity row by row between two feature matrices."""
    cos = cosine_rows(reference, other)
    return Closeness(float(cos.min()), float(cos.mean()))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


class LibraryStepFailed(ModelFileError):
    """torch.onnx or an ONNX Runtime tool failed on a model it should handle (a library version this
    project does not support, or a bug there): one line naming the step and the versions."""


def library_versions() -> str:
    """``torch 2.x, onnx 1.y, ...`` for the libraries that export and quantize."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


@contextmanager
def library_step(step: str) -> Iterator[None]:
    """Turn an unexpected exception from a library into ``LibraryStepFailed`` (the original stays chained:
    ``--debug`` shows its traceback); the project's own errors pass through."""
    try:
        yield
    except ReidError:
        raise
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colours its messages
        first_line = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LibraryStepFailed(f"{step} failed inside the library: {type(exc).__name__}: {first_line} "
                                f"({library_versions()}; see README 'Supported versions'; --debug shows the "
                                f"traceback)") from exc


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    """Hide what libraries log through the root logger (the exporter's optimiser at INFO, ORT's
    quantizer's pre-processing hint at WARNING); errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
