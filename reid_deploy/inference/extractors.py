"""One feature-extractor interface for every model file: PyTorch, ONNX Runtime, TensorRT.

``load_extractor(path)`` picks the backend from the file name. ``FeatureExtractor.features`` takes uint8
NCHW images on the extractor's device and is the one place where they are normalised
(``Preprocess.normalize_tensor``) and mirrored for flip averaging, for every backend: PyTorch and TensorRT
on their device, ONNX Runtime on the CPU (the same arithmetic, so the same numbers). ``embed`` takes person
crops (arrays, PIL images or paths) and ``__call__`` numpy batches. Features come back L2-normalised,
float32 [N, feat_dim].

PyTorch models run in ``precision`` fp32, fp16 or bf16 (``auto``: fp16 on CUDA, fp32 on CPU), optionally
compiled (``torch.compile``, CUDA only). fp32 on CUDA lets matrix products use TF32, set around each forward
and restored after it, so no process-wide setting changes. The first batch of any setting other than exact
fp32 is also run in exact fp32 and the cosine between the two is logged once.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_deploy.console import log
from reid_deploy.crypto import read_model_bytes
from reid_deploy.errors import BackendUnavailable, ModelFileError, SpecError, missing_file
from reid_deploy.inference.base import FeatureExtractor
from reid_deploy.inference.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees it, else the CPU; otherwise the named device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """fp32, fp16 or bf16 for a PyTorch model on ``device``; ``auto`` / None: fp16 on CUDA, fp32 on CPU.
    fp16/bf16 on a CPU fall back to fp32 with one warning; bf16 on a GPU without it is refused."""
    import torch

    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise SpecError(f"inference.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and precision != "fp32":
        log.warning("inference.precision=%s runs on CUDA only: using fp32 on the CPU", precision)
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise BackendUnavailable(f"inference.precision=bf16 but {torch.cuda.get_device_name(device)} has no "
                                 f"bfloat16: use fp16")
    return precision


class TorchExtractor(FeatureExtractor):
    """A PyTorch ReidModel (in memory, or rebuilt from a checkpoint with ``from_file``).

    The given model is moved to the device and used as it is for fp32; for fp16/bf16 a cast copy runs, so
    the caller's model (e.g. the one in training) keeps its weights and mode.
    """

    backend = "pytorch"

    def __init__(self, model, spec, device: str = "auto", precision: str | None = "auto", compile: bool = False):
        import torch

        self._torch = torch
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if compile and self.device.type != "cuda":
            log.warning("inference.compile applies on CUDA only: running the model eagerly on the CPU")
            compile = False
        self.compiled = compile
        self.spec = spec
        self.preprocess = Preprocess.from_spec(spec)
        self.feat_dim = spec.model.feat_dim
        self.model = model.to(self.device)
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self._cast = self.model if self._dtype == torch.float32 else copy.deepcopy(self.model).to(self._dtype)
        self._runner = torch.compile(self._cast) if compile else self._cast
        if compile:
            log.info("torch.compile: the first batch compiles the model (tens of seconds)")
        self._batch = 0  # largest batch seen: a compiled model gets smaller ones padded to it (no recompiling)
        self._tf32 = self.device.type == "cuda" and self._dtype == torch.float32
        self._parity_pending = self.device.type == "cuda"  # anything on CUDA differs from exact fp32

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto", precision: str | None = "auto",
                  compile: bool = False) -> TorchExtractor:
        from reid_deploy.model.checkpoint import load_model_file

        model, spec = load_model_file(path)
        return cls(model, spec, device, precision, compile)

    @property
    def setting(self) -> str:
        """The precision as run, e.g. ``fp16``, ``fp32 (TF32 matmuls)``, ``fp16, torch.compile``."""
        return self.precision + (" (TF32 matmuls)" if self._tf32 else "") + (", torch.compile" if self.compiled else "")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        torch = self._torch
        n = len(inputs)
        if self.compiled:
            self._batch = max(self._batch, n)
            if n < self._batch:
                inputs = torch.cat([inputs, inputs.new_zeros((self._batch - n, *inputs.shape[1:]))])
        with self._eval(self._cast), _matmul_precision("high" if self._tf32 else None):
            feats = self._runner(inputs.to(self._dtype)).float()[:n]
        if self._parity_pending:
            self._parity_pending = False
            self._log_parity(inputs[:n], feats)
        return feats

    def _log_parity(self, inputs: torch.Tensor, feats: torch.Tensor) -> None:
        """Log the cosine between this setting's features and exact fp32's on one batch."""
        with self._torch.inference_mode(), self._eval(self.model), _matmul_precision("highest"):
            reference = self.model(inputs.float()).float()
        cosine = (self._torch.nn.functional.normalize(feats, dim=1)
                  * self._torch.nn.functional.normalize(reference, dim=1)).sum(dim=1)
        log.info("PyTorch %s on %s: cosine to fp32 on the first batch of %d: min %.6f, mean %.6f", self.setting,
                 self.device, len(inputs), cosine.min().item(), cosine.mean().item())

    @contextmanager
    def _eval(self, module: Any) -> Iterator[None]:
        """``module`` in eval mode for the block, its own mode restored after."""
        was_training = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was_training)


@contextmanager
def _matmul_precision(precision: str | None) -> Iterator[None]:
    """torch's float32 matmul precision (``high``: TF32 on CUDA) for the block, the previous one restored."""
    import torch

    if precision is None:
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class OrtExtractor(FeatureExtractor):
    """An ONNX model in ONNX Runtime, built from bytes in memory (decrypted models never touch disk).

    Inputs are normalised on the CPU with torch (``features``), then handed to ONNX Runtime as numpy; with
    the CUDA provider ONNX Runtime copies them to the GPU itself.
    """

    backend = "onnxruntime"

    def __init__(self, model: bytes, source: str = "<memory>", device: str = "auto",
                 threads: int | None = None):
        import torch

        from reid_deploy.inference.metadata import INPUT_NAME, OUTPUT_NAME, read_metadata

        self.device = torch.device("cpu")
        self.session = ort_session(model, device, threads)
        self.providers = self.session.get_providers()
        props = self.session.get_modelmeta().custom_metadata_map
        self.preprocess, self.feat_dim = read_metadata(props, source)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self._input = INPUT_NAME if INPUT_NAME in inputs else inputs[0]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        if device != "cpu":  # the caller let us choose: say what was chosen
            _report_providers(source, self.providers)

    @classmethod
    def from_file(cls, path: str | Path, key: str | None = None, device: str = "auto",
                  threads: int | None = None) -> OrtExtractor:
        return cls(read_model_bytes(path, key), str(path), device, threads)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """ONNX Runtime on a normalised float32 numpy batch."""
        return self.session.run([self._output], {self._input: batch})[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.run(np.ascontiguousarray(inputs.numpy(), dtype=np.float32)))


def _report_providers(source: str, providers: list[str]) -> None:
    """INFO: the providers a session runs on; a warning when torch sees a GPU that ONNX Runtime does not use."""
    import torch

    log.info("ONNX Runtime runs %s on %s", source, ", ".join(providers))
    if "CUDAExecutionProvider" in providers or not torch.cuda.is_available():
        return
    installed = {name for name in ("onnxruntime", "onnxruntime-gpu") if _installed(name)}
    if len(installed) == 2:
        log.warning("torch sees a CUDA GPU but ONNX Runtime runs on the CPU: onnxruntime and onnxruntime-gpu are "
                    "both installed and the CPU build hides the GPU one; pip uninstall -y onnxruntime "
                    "onnxruntime-gpu, then pip install 'reid-deploy[gpu]'")
    else:
        log.warning("torch sees a CUDA GPU but ONNX Runtime runs on the CPU (no CUDA provider: %s); for the GPU, "
                    "pip uninstall -y onnxruntime, then pip install 'reid-deploy[gpu]'",
                    ", ".join(sorted(installed)) or "onnxruntime")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def ort_session(model: bytes, device: str = "auto", threads: int | None = None):
    """An ONNX Runtime session (all graph optimisations; CUDA provider when present and allowed)."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    except ImportError:
        raise BackendUnavailable("ONNX Runtime is not installed: pip install 'reid-deploy[cpu]' (or "
                                 "'reid-deploy[gpu]' on an NVIDIA GPU machine)") from None

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


def is_torch_model(path: str | Path) -> bool:
    return Path(path).name.lower().endswith((".pth", ".pt"))


def warn_torch_only(path: str | Path, precision: str | None, compile: bool) -> None:
    """One warning when PyTorch-only settings are asked of an ONNX model or a TensorRT engine."""
    if is_torch_model(path):
        return
    asked = [f"inference.precision={precision}"] if precision not in (None, "auto") else []
    asked += ["inference.compile=true"] if compile else []
    if asked:
        log.warning("%s apply to .pth models only: %s runs at the precision it was built with",
                    " and ".join(asked), Path(path).name)


def load_extractor(path: str | Path, key: str | None = None, device: str = "auto", precision: str | None = None,
                   compile: bool = False) -> FeatureExtractor:
    """The extractor for a model file: ``.pth``, ``.onnx``, ``.onnx.enc`` or ``.engine``.

    ``precision`` and ``compile`` apply to ``.pth`` models (see ``TorchExtractor``); ``key`` decrypts
    ``.onnx.enc`` models in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "model file"))
    warn_torch_only(path, precision, compile)
    name = path.name.lower()
    if is_torch_model(path):
        return TorchExtractor.from_file(path, device, precision, compile)
    if name.endswith((".onnx", ".onnx.enc")):
        return OrtExtractor.from_file(path, key, device)
    if name.endswith(".engine"):
        from reid_deploy.inference.tensorrt import TrtExtractor

        return TrtExtractor.from_file(path, device)
    raise ModelFileError(f"unsupported model file {path}: expected .pth, .onnx, .onnx.enc or .engine")
