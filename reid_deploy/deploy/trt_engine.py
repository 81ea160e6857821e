"""``reid build-engine``: a TensorRT engine (or an optimised ONNX Runtime model) from the exported ONNX.

TensorRT path, written against the TensorRT 10.x/11.x Python API: the ONNX is decrypted in memory and
its bytes go to ``OnnxParser.parse``; the network is strongly typed (TensorRT 11 only has that; in 10.x
it is what the docs prescribe for explicit Q/DQ quantization), so the precision comes from the ONNX:
fp32 as exported, fp16 converted in memory (``onnxruntime.transformers.float16``, I/O kept float32, checked
here only in ONNX Runtime: cosine 0.9996 to fp32 on the tiny test model),
int8 from the Q/DQ model of ``export.int8=static``. One optimisation profile covers
min/opt/max_batch_size. Output: ``engines/<name>.<gpu>.<precision>.engine`` + ``.engine.json`` sidecar.
Before TensorRT is imported, the graph is checked against the parser's documented support
(``trt_support``): a node it would refuse stops the build with one line naming it, also where TensorRT
is absent.

``build_engine.target=onnxruntime``: the CPU deployment artefact, an ONNX Runtime-optimised (level
all: specific to this CPU's instruction set family, like an engine is to its GPU) fp32 or dynamic INT8
model, encrypted when a key is given.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from reid_deploy.console import log
from reid_deploy.deploy.artefacts import default_engine_path, model_name, write_model
from reid_deploy.errors import ModelFileError, SpecError
from reid_deploy.inference.metadata import INPUT_NAME, OUTPUT_NAME, read_metadata
from reid_deploy.inference.tensorrt import import_tensorrt


def run_build_engine(spec: Any, key_file: Path | None = None) -> Path:
    """The whole ``reid build-engine`` command; returns the written engine/model path."""
    from reid_deploy.crypto import read_model_bytes
    from reid_deploy.files import RunRecord, write_text_atomic
    from reid_deploy.keys import resolve_key

    cfg = spec.build_engine
    if not cfg.onnx_file:
        raise SpecError("spec error: build_engine.onnx_file is not set; give the exported .onnx or .onnx.enc")
    source = Path(cfg.onnx_file)
    key = resolve_key(key_file, spec.encryption_key)
    if cfg.target == "tensorrt":
        data = read_model_bytes(source, key)
        out, sidecar = _build_tensorrt(data, source, spec)
    else:
        data = read_model_bytes(source, key)
        out, sidecar = _build_onnxruntime(data, source, spec, key)
    sidecar["source_sha256"] = hashlib.sha256(data).hexdigest()
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(sidecar, indent=2) + "\n")
    RunRecord(spec, "build_engine").status(event="build_engine", output=out, **{
        k: v for k, v in sidecar.items() if k != "metadata"})
    return out


def _props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _check_precision(model: Any, precision: str, source: Path) -> None:
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if precision == "int8" and not quantized:
        raise SpecError(f"spec error: build_engine.precision=int8 needs the Q/DQ model (export.int8=static "
                        f"writes <name>.qdq.onnx[.enc]); {source} has no QuantizeLinear nodes")
    if precision != "int8" and quantized:
        raise SpecError(f"spec error: {source} is a Q/DQ INT8 model; set build_engine.precision=int8")


def _build_tensorrt(data: bytes, source: Path, spec: Any) -> tuple[Path, dict[str, Any]]:
    import onnx
    from google.protobuf.message import DecodeError

    from reid_deploy.deploy.trt_support import require_tensorrt_support

    cfg = spec.build_engine
    try:
        model = onnx.load_from_string(data)
    except DecodeError:
        raise ModelFileError(f"{source} is not an ONNX model (it does not decode as one)") from None
    _check_precision(model, cfg.precision, source)
    # The parser's documented support, before TensorRT is imported: where it is absent this still says
    # which node would not parse.
    readiness = require_tensorrt_support(model, str(source))
    trt = import_tensorrt()
    import torch

    props = _props(model)
    preprocess, feat_dim = read_metadata(props, str(source))
    if cfg.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        half = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
        half.topological_sort()  # the converter appends input casts last; TensorRT's parser needs order
        data = half.model.SerializeToString()
    del model
    gpu = torch.cuda.get_device_name(0)
    out = Path(cfg.engine_file) if cfg.engine_file else \
        default_engine_path(spec, source, re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_"))
    chw = (preprocess.channels, preprocess.height, preprocess.width)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFileError(f"TensorRT cannot parse {source}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_size << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (cfg.min_batch_size, *chw), (cfg.opt_batch_size, *chw),
                      (cfg.max_batch_size, *chw))
    config.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    if cfg.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32, as at the export parity check
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):  # None: unreadable file
        log.warning("timing cache %s is from another GPU or TensorRT version: starting an empty one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log.info("building the %s TensorRT engine for %s (minutes for a large model)", cfg.precision, gpu)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFileError(f"TensorRT could not build an engine from {source} (see its log above)")
    from reid_deploy.files import write_bytes_atomic

    # DeepStream and Triton load engines as they are, so the engine is not encrypted; it holds the weights,
    # so only its owner may read it.
    write_bytes_atomic(out, bytes(serialized), mode=0o600)
    if cache_path:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return out, {"target": "tensorrt", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                 "input_shape": list(chw), "feat_dim": feat_dim, "min_batch_size": cfg.min_batch_size,
                 "opt_batch_size": cfg.opt_batch_size, "max_batch_size": cfg.max_batch_size,
                 "precision": cfg.precision, "tensorrt_version": trt.__version__, "gpu": gpu,
                 "source_onnx": str(source), "parser_check": readiness.line(), "metadata": props}


def _build_onnxruntime(data: bytes, source: Path, spec: Any, key: str | None) -> tuple[Path, dict[str, Any]]:
    import platform

    import onnx
    import onnxruntime as ort

    from reid_deploy.deploy.quantize import NothingToQuantize, private_tmpdir, quantize_dynamic_bytes

    cfg = spec.build_engine
    if cfg.precision == "fp16":
        raise SpecError("spec error: build_engine.precision=fp16 is not allowed for target onnxruntime "
                        "(CPU); expected fp32 or int8 (dynamic INT8)")
    model = onnx.load_from_string(data)
    _check_precision(model, "fp32", source)  # the CPU artefact starts from the FP32 model
    props = _props(model)
    read_metadata(props, str(source))
    del model
    if cfg.precision == "int8":
        try:
            data = quantize_dynamic_bytes(data)
        except NothingToQuantize as exc:
            raise SpecError(f"spec error: build_engine.precision=int8 for target onnxruntime: {source}: {exc}") \
                from None
    with private_tmpdir() as tmp:  # ORT writes the optimised model only to a file: keep it private
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp / "optimized.onnx")
        options.log_severity_level = 3  # errors only (not the "hardware-specific model" notice)
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(tmp / "optimized.onnx")
    onnx.helper.set_model_props(optimized, props)
    name = f"{model_name(source)}.cpu.{cfg.precision}.onnx" + (".enc" if key else "")
    out = Path(cfg.engine_file) if cfg.engine_file else spec.command_dir("build_engine") / "engines" / name
    write_model(optimized.SerializeToString(), out, key)
    return out, {"target": "onnxruntime", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                 "precision": cfg.precision, "encrypted": bool(key), "onnxruntime_version": ort.__version__,
                 "cpu": platform.processor() or platform.machine(), "source_onnx": str(source),
                 "metadata": props}
