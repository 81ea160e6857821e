"""One feature-extractor interface for every model file: PyTorch, ONNX Runtime, TensorRT.

``load_extractor(path)`` picks the backend from the file name. Every extractor takes a batch that
``Preprocess`` made (float32 NCHW, normalised) and returns L2-normalised float32 features [N, feat_dim].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from reid_deploy.errors import BackendUnavailable, EncryptionError, ModelFileError, missing_file
from reid_deploy.inference.preprocess import Preprocess


class FeatureExtractor(ABC):
    backend: str
    preprocess: Preprocess
    feat_dim: int
    max_batch: int | None = None  # largest batch one call may take (TensorRT profile); None: any

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
    def from_file(cls, path: str | Path, device: str = "auto") -> TorchExtractor:
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


class OrtExtractor(FeatureExtractor):
    """An ONNX model in ONNX Runtime, built from bytes in memory (decrypted models never touch disk)."""

    backend = "onnxruntime"

    def __init__(self, model: bytes, source: str = "<memory>", device: str = "auto",
                 threads: int | None = None):
        from reid_deploy.inference.metadata import INPUT_NAME, OUTPUT_NAME, read_metadata

        self.session = ort_session(model, device, threads)
        self.providers = self.session.get_providers()
        props = self.session.get_modelmeta().custom_metadata_map
        self.preprocess, self.feat_dim = read_metadata(props, source)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self._input = INPUT_NAME if INPUT_NAME in inputs else inputs[0]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]

    @classmethod
    def from_file(cls, path: str | Path, key: str | None = None, device: str = "auto",
                  threads: int | None = None) -> OrtExtractor:
        return cls(read_model_bytes(path, key), str(path), device, threads)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: batch})[0]


def ort_session(model: bytes, device: str = "auto", threads: int | None = None):
    """An ONNX Runtime session (all graph optimisations; CUDA provider when present and allowed)."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    available = ort.get_available_providers()
    kind, _, index = device.partition(":")  # "cuda:1" -> the CUDA provider on GPU 1
    if kind == "cuda" and "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(f"device={device} but this ONNX Runtime has no CUDA provider: "
                                 "pip install 'reid-deploy[gpu]' on an NVIDIA GPU machine")
    providers: list = ["CPUExecutionProvider"]
    if kind in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index or 0)}))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf,
            ort_errors.NotImplemented, ort_errors.RuntimeException) as exc:
        raise ModelFileError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def read_model_bytes(path: str | Path, key: str | None = None) -> bytes:
    """The ONNX bytes of a plain or encrypted model file (decrypted in memory only)."""
    from reid_deploy.crypto import decrypt_to_bytes, is_encrypted

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "model file"))
    if is_encrypted(path):
        if not key:
            raise EncryptionError(f"{path} is encrypted: give the key with --key-file, $REID_KEY or "
                                  f"encryption_key")
        return decrypt_to_bytes(path, key)
    if path.name.lower().endswith(".enc"):
        raise EncryptionError(f"{path} is named .enc but is not a reid-deploy encrypted file")
    return path.read_bytes()


def load_extractor(path: str | Path, key: str | None = None, device: str = "auto") -> FeatureExtractor:
    """The extractor for a model file: ``.pth``, ``.onnx``, ``.onnx.enc`` or ``.engine``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "model file"))
    name = path.name.lower()
    if name.endswith((".pth", ".pt")):
        return TorchExtractor.from_file(path, device)
    if name.endswith((".onnx", ".onnx.enc")):
        return OrtExtractor.from_file(path, key, device)
    if name.endswith(".engine"):
        from reid_deploy.inference.tensorrt import TrtExtractor

        return TrtExtractor.from_file(path, device)
    raise ModelFileError(f"unsupported model file {path}: expected .pth, .onnx, .onnx.enc or .engine")
