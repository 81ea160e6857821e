"""The identity of a model file: which weights it holds, and in which runtime and precision it runs them.

Every artefact of one trained model (the ``.pth``, the exported ``.onnx`` / ``.onnx.enc``, its INT8
models, the ONNX Runtime build and the TensorRT engine) carries the same ``weights_sha256``: a sha256 of
the model's state_dict (names sorted; each tensor's name, dtype, shape and bytes). ``reid export``
records it in the ONNX metadata_props, which ONNX Runtime's quantizers and the ONNX Runtime build keep;
an engine's sidecar JSON holds the metadata of the ONNX it was built from. So a gallery index built
with one artefact can accept the others (``same_weights``).

ONNX files exported before weights hashes existed have none; their identity is then their file hash (of
the decrypted bytes for ``.enc``: encrypting one model twice gives different files), which is also what
index files written then hold (``model_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reid_deploy.errors import ModelFileError, missing_file

WEIGHTS_KEY = "weights_sha256"
INT8_COSINE_KEY = "int8_cosine_to_fp32"  # min cosine of an INT8 model's features to FP32's, measured at export
# operators that give a graph's precision away (ONNX Runtime's fused forms included)
_DYNAMIC_INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                     "MatMulIntegerToFloat"}
_STATIC_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}
_ENGINE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-static"}  # int8 engines come from Q/DQ


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """sha256 over a model state_dict: for each tensor in name order, its name, dtype, shape and bytes."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"the model weights hold a {type(tensor).__name__} at {name}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0{data.nbytes}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def model_identity(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """``weights_sha256``, ``runtime``, ``precision``, ``model_name``, ``file_sha256`` of a ``.pth``,
    ``.onnx``, ``.onnx.enc`` or ``.engine`` file (an engine's from its sidecar JSON); INT8 models and
    engines built from them add ``int8_cosine_to_fp32``, engines ``source_sha256`` (their ONNX's)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "model file"))
    name = path.name.lower()
    if name.endswith((".pth", ".pt")):
        return _checkpoint_identity(path)
    if name.endswith((".onnx", ".onnx.enc")):
        from reid_deploy.crypto import read_model_bytes

        return onnx_identity(read_model_bytes(path, key), path.name)
    if name.endswith(".engine"):
        return _engine_identity(path)
    raise ModelFileError(f"unsupported model file {path}: expected .pth, .onnx, .onnx.enc or .engine")


def onnx_identity(data: bytes, name: str) -> dict[str, Any]:
    """The identity of ONNX bytes in memory (the decrypted bytes of the file ``name``)."""
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # untrusted bytes: any parse failure means "not an ONNX model"
        raise ModelFileError(f"{name} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None
    props = {p.key: p.value for p in model.metadata_props}
    file_sha256 = hashlib.sha256(data).hexdigest()
    return _with_cosine({"weights_sha256": props.get(WEIGHTS_KEY), "runtime": "onnxruntime",
                         "precision": _onnx_precision(model), "model_name": name, "file_sha256": file_sha256},
                        props)


def same_weights(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two identities (or index fingerprints, old ones included) are artefacts of one set of
    weights: equal weights hashes where both have one, else a shared file hash (an engine also answers to
    the hash of the ONNX it was built from; an old index fingerprint to its ``model_sha256``)."""
    if a.get(WEIGHTS_KEY) and b.get(WEIGHTS_KEY):
        return a[WEIGHTS_KEY] == b[WEIGHTS_KEY]
    return bool(_file_hashes(a) & _file_hashes(b))


def identity_hash(identity: Mapping[str, Any]) -> str:
    """The hash an identity is matched by: its weights hash, else its file hash (old fingerprints too)."""
    return identity.get(WEIGHTS_KEY) or identity.get("file_sha256") or identity.get("model_sha256") or ""


def describe(identity: Mapping[str, Any]) -> str:
    """``model.qdq.onnx.enc (onnxruntime int8-static)``; just the name for an old index fingerprint."""
    name = identity.get("model_name") or "an unnamed model"
    if identity.get("runtime"):
        return f"{name} ({identity['runtime']} {identity.get('precision') or 'unknown precision'})"
    return name


def _checkpoint_identity(path: Path) -> dict[str, Any]:
    from reid_deploy.model.checkpoint import read_checkpoint

    weights = read_checkpoint(path).get("model")
    if not isinstance(weights, Mapping):
        raise ModelFileError(f"{path} is not a reid-deploy checkpoint (no model weights)")
    return {"weights_sha256": weights_sha256(weights), "runtime": "pytorch", "precision": "fp32",
            "model_name": path.name, "file_sha256": _file_sha256(path)}


def _engine_identity(path: Path) -> dict[str, Any]:
    sidecar_path = path.with_name(path.name + ".json")
    if not sidecar_path.is_file():
        raise ModelFileError(f"{path} has no sidecar {sidecar_path.name} (written by 'reid build-engine')")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        props = dict(sidecar.get("metadata") or {})
        precision = _ENGINE_PRECISION.get(sidecar.get("precision"), sidecar.get("precision"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
        raise ModelFileError(f"damaged engine sidecar {sidecar_path}: rebuild it with 'reid build-engine'") from None
    return _with_cosine({"weights_sha256": props.get(WEIGHTS_KEY), "runtime": "tensorrt", "precision": precision,
                         "model_name": path.name, "file_sha256": _file_sha256(path),
                         "source_sha256": sidecar.get("source_sha256")}, props)


def _with_cosine(identity: dict[str, Any], props: Mapping[str, str]) -> dict[str, Any]:
    try:
        identity[INT8_COSINE_KEY] = float(props[INT8_COSINE_KEY])
    except (KeyError, ValueError):
        pass  # not an INT8 model, or one exported before the cosine was recorded
    return identity


def _onnx_precision(model: Any) -> str:
    """int8-dynamic, int8-static, fp16 or fp32, from the graph's operators and weights."""
    from onnx import TensorProto

    ops = {node.op_type for node in model.graph.node}
    if ops & _DYNAMIC_INT8_OPS:
        return "int8-dynamic"
    if ops & _STATIC_INT8_OPS:
        return "int8-static"
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _file_hashes(identity: Mapping[str, Any]) -> set[str]:
    return {identity.get(k) for k in ("file_sha256", "source_sha256", "model_sha256")} - {None, ""}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
