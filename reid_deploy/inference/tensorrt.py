"""The TensorRT runtime: a serialized engine (from ``reid build-engine``) as a ``FeatureExtractor``.

Written against the TensorRT 10.x Python API (``execute_async_v3``, named I/O tensors); the build lives
in ``deploy/trt_engine.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reid_deploy.errors import BackendUnavailable, ModelFileError
from reid_deploy.inference.base import FeatureExtractor
from reid_deploy.inference.metadata import INPUT_NAME, OUTPUT_NAME, read_metadata

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'reid-deploy[tensorrt]' on an NVIDIA GPU machine"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module when it and a CUDA GPU are usable; else BackendUnavailable (one line)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({str(exc).splitlines()[0][:120]}): "
                                 f"{INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT needs an NVIDIA GPU with CUDA and none is visible: {INSTALL_HINT}")
    return trt


class TrtExtractor(FeatureExtractor):
    """A TensorRT engine: torch CUDA tensors for I/O (normalised on the GPU by ``features``),
    ``execute_async_v3`` on the engine's own torch stream."""

    backend = "tensorrt"

    def __init__(self, engine: bytes, sidecar: dict[str, Any], source: str, device: str = "auto"):
        if device == "cpu":
            raise BackendUnavailable(f"{source} is a TensorRT engine: it runs on an NVIDIA GPU only; use the "
                                     f".onnx/.onnx.enc model on CPU")
        trt = import_tensorrt()
        import torch

        self._torch = torch
        self.device = torch.device("cuda" if device == "auto" else device)
        self.preprocess, self.feat_dim = read_metadata(sidecar.get("metadata", {}), source)
        with torch.cuda.device(self.device):  # an engine is bound to the GPU current when it is deserialized
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self._runtime.deserialize_cuda_engine(engine)
            if self.engine is None:
                raise ModelFileError(f"TensorRT cannot load {source}: built with another TensorRT version or "
                                     f"for another GPU? (sidecar: TensorRT {sidecar.get('tensorrt_version')}, "
                                     f"{sidecar.get('gpu')}); rebuild it with 'reid build-engine'")
            self._check_io(trt, source)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise ModelFileError(f"TensorRT could not create an execution context for {source} (GPU memory?)")
            self.stream = torch.cuda.Stream(device=self.device)
        low, _, high = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)  # the engine's, not the sidecar's
        self.min_batch, self.max_batch = int(low[0]), int(high[0])

    def _check_io(self, trt: Any, source: str) -> None:
        """Exactly a float32 input ``input`` and a float32 output ``fc_pred``, else ModelFileError."""
        engine = self.engine
        found = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {INPUT_NAME: trt.TensorIOMode.INPUT, OUTPUT_NAME: trt.TensorIOMode.OUTPUT}
        if found != set(expected) or any(engine.get_tensor_mode(name) != mode for name, mode in expected.items()) \
                or any(engine.get_tensor_dtype(name) != trt.float32 for name in expected):
            raise ModelFileError(f"{source} does not have exactly a float32 input '{INPUT_NAME}' and a float32 "
                                 f"output '{OUTPUT_NAME}' (it has {sorted(found)}); rebuild it with "
                                 f"'reid build-engine'")

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto") -> TrtExtractor:
        path = Path(path)
        sidecar_path = path.with_name(path.name + ".json")
        if not sidecar_path.is_file():
            raise ModelFileError(f"{path} has no sidecar {sidecar_path.name} (written by 'reid build-engine')")
        return cls(path.read_bytes(), json.loads(sidecar_path.read_text()), str(path), device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Queue the engine on its own stream, ordered after the caller's stream and before its later work."""
        torch = self._torch
        n = len(inputs)
        if n < self.min_batch:  # below the profile: pad with zeros, drop their features
            inputs = torch.cat([inputs, inputs.new_zeros((self.min_batch - n, *inputs.shape[1:]))])
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device):
            x = inputs.to(self.device, torch.float32).contiguous()
            out = torch.empty((len(x), self.feat_dim), dtype=torch.float32, device=self.device)
            if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise ModelFileError(f"TensorRT rejects a batch of {len(x)} (profile {self.min_batch}.."
                                     f"{self.max_batch})")
            if tuple(self.context.get_tensor_shape(OUTPUT_NAME)) != tuple(out.shape):
                raise ModelFileError(f"the engine's output is {tuple(self.context.get_tensor_shape(OUTPUT_NAME))}, "
                                     f"its sidecar says feat_dim {self.feat_dim}: rebuild with 'reid build-engine'")
            self.stream.wait_stream(caller)  # inputs are made on the caller's stream
            ok = (self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
                  and self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
                  and self.context.execute_async_v3(self.stream.cuda_stream))
            if not ok:
                raise ModelFileError(f"TensorRT execution failed for a batch of {len(x)} "
                                     f"(profile {self.min_batch}..{self.max_batch})")
            x.record_stream(self.stream)  # memory the engine reads and writes stays reserved until it is done
            out.record_stream(self.stream)
            caller.wait_stream(self.stream)
        return out[:n]
