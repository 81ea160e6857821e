"""``reid export``: checkpoint -> checked ONNX (encrypted when a key is given) -> optional INT8 models.

The graph has input ``input`` [batch, C, H, W] float32 (made by ``Preprocess``) and output ``fc_pred``
[batch, feat_dim] float32 (L2-normalised inside the network), a dynamic batch axis and the metadata of
``deploy.metadata``. Everything happens in memory: the ONNX bytes are written once, encrypted or (only
without a key or with ``--no-encrypt``) plain.

Exporter: for opset >= 18 the dynamo exporter (``torch.export``, PyTorch's default): the batch is a
symbolic dimension, so export fails rather than silently baking a batch size into Swin's window
reshapes, and the graph is ~5x smaller (no Shape/Gather/Concat chains from tracing) — simpler for
TensorRT's parser. It cannot emit opset 17 (no Pad down-converter), so ``export.opset=17`` (older
TensorRT/DeepStream) uses the TorchScript exporter, which traces the batch as dynamic through
``dynamic_axes``. Both are verified the same way: checker, shape inference, parity at batch 1 and 7.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reid_deploy.console import log
from reid_deploy.deploy.artefacts import artefact_path, write_model
from reid_deploy.errors import DataError, EncryptionError, ModelFileError, SpecError
from reid_deploy.inference.metadata import INPUT_NAME, OUTPUT_NAME, build_metadata

MIN_COSINE = 0.9999
PARITY_BATCHES = (1, 7)
REAL_IMAGES = 16


@dataclass
class Parity:
    """PyTorch vs ONNX Runtime on one input batch."""

    inputs: str
    batch: int
    max_abs_diff: float
    min_cosine: float

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "batch": self.batch, "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
                "min_cosine": round(self.min_cosine, 7)}


@dataclass
class ExportResult:
    onnx_file: Path
    encrypted: bool
    exporter: str
    opset: int
    parity: list[Parity]
    int8: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> file, closeness, mAP
    map_fp32: float | None = None
    tensorrt: str = ""  # the TensorRT parser readiness line (deploy.trt_support)
    nvinfer_config: Path | None = None  # the DeepStream snippet (deploy.deepstream)
    tracker_config: Path | None = None  # the nvtracker ReID section (deploy.deepstream); None for 1-channel models

    def summary(self) -> list[str]:
        """Lines for the terminal."""
        lines = [f"parity {p.inputs} batch {p.batch}: max |diff| {p.max_abs_diff:.2e}, "
                 f"min cosine {p.min_cosine:.7f}" for p in self.parity]
        lines.append(f"wrote {self.onnx_file} ({'encrypted' if self.encrypted else 'NOT encrypted'}, "
                     f"{self.exporter} exporter, opset {self.opset})")
        lines += [self.tensorrt, f"wrote {self.nvinfer_config} (DeepStream nvinfer config)"]
        if self.tracker_config:
            lines.append(f"wrote {self.tracker_config} (DeepStream nvtracker ReID config)")
        if self.map_fp32 is not None:
            lines.append(f"mAP FP32 (ONNX Runtime): {100 * self.map_fp32:.2f}")
        for kind, info in self.int8.items():
            text = (f"int8 {kind}: cosine to FP32 ({info['images']}) min {info['min_cosine']:.4f} "
                    f"mean {info['mean_cosine']:.4f}")
            if "mAP" in info:
                text += f", mAP {100 * info['mAP']:.2f} ({100 * (info['mAP'] - self.map_fp32):+.2f})"
            lines.append(f"{text} -> {info['file']}")
            if "tensorrt" in info:
                lines.append(f"int8 {kind}: {info['tensorrt']['summary']}")
        return lines


def run_export(spec: Any, key_file: Path | None = None, no_encrypt: bool = False) -> ExportResult:
    """The whole ``reid export`` command: export, check, write, quantize, record."""
    from reid_deploy.crypto import ENCRYPTED_SUFFIX
    from reid_deploy.deploy.deepstream import write_deepstream_configs
    from reid_deploy.deploy.quantize import NothingToQuantize
    from reid_deploy.deploy.trt_support import check_tensorrt_support
    from reid_deploy.files import RunRecord
    from reid_deploy.keys import resolve_key
    from reid_deploy.model.checkpoint import load_model_file

    cfg = spec.export
    if not cfg.checkpoint:
        raise SpecError("spec error: export.checkpoint is not set; give the .pth to export")
    if not str(cfg.checkpoint).lower().endswith((".pth", ".pt")):
        raise SpecError(f"spec error: export.checkpoint = {cfg.checkpoint}: export starts from a PyTorch "
                        f"checkpoint (.pth from 'reid train'), not an exported model")
    key = None if no_encrypt else resolve_key(key_file, spec.encryption_key)
    target = Path(cfg.onnx_file) if cfg.onnx_file else spec.command_dir("export") / "model.onnx"
    if key and not target.name.endswith(ENCRYPTED_SUFFIX):
        target = target.with_name(target.name + ENCRYPTED_SUFFIX)
    if not key and not no_encrypt:
        raise EncryptionError("no key given: export writes encrypted models; give --key-file, $REID_KEY or "
                              "encryption_key, or pass --no-encrypt for a plain ONNX file")
    if not key and target.name.endswith(ENCRYPTED_SUFFIX):
        raise EncryptionError(f"export.onnx_file {target} ends in .enc but no key is given (--key-file, "
                              f"$REID_KEY or encryption_key)")
    model, model_spec = load_model_file(cfg.checkpoint)
    proto, exporter = export_proto(model, model_spec, cfg.opset)
    check_graph(proto, model_spec)
    tensorrt = check_tensorrt_support(proto)
    model_bytes = proto.SerializeToString()
    del proto
    batches = parity_batches(model_spec, spec)
    parity, onnx_extractor = check_parity(model, model_bytes, batches)
    record = RunRecord(spec, "export")
    write_model(model_bytes, target, key)
    nvinfer_config, tracker_config = write_deepstream_configs(spec, model_spec, target, bool(key))
    result = ExportResult(target, bool(key), exporter, cfg.opset, parity, tensorrt=tensorrt.line(),
                          nvinfer_config=nvinfer_config, tracker_config=tracker_config)
    if cfg.eval_map:
        from reid_deploy.evaluate.dataset_metrics import spec_map

        result.map_fp32 = spec_map(onnx_extractor, spec)
    kinds = {"none": (), "dynamic": ("dynamic",), "static": ("static",), "both": ("dynamic", "static")}[cfg.int8]
    closeness_batches = [b for b in batches if b[0] == "real"] or batches  # INT8 is calibrated for real images
    reference = np.concatenate([onnx_extractor(x) for _, x in closeness_batches]) if kinds else None
    for kind in kinds:
        try:
            result.int8[kind] = _int8(kind, model_bytes, model_spec, spec, target, key, closeness_batches,
                                      reference)
        except NothingToQuantize as exc:
            log.warning("no %s INT8 model written: %s", kind, exc)
    record.status(event="export", onnx_file=target, encrypted=bool(key), exporter=exporter, opset=cfg.opset,
                  parity=[p.as_dict() for p in parity], map_fp32=result.map_fp32, int8=result.int8,
                  tensorrt=tensorrt.as_dict(), nvinfer_config=result.nvinfer_config,
                  tracker_config=result.tracker_config)
    return result


def export_proto(model: Any, spec: Any, opset: int) -> tuple[Any, str]:
    """(ModelProto with metadata, exporter name) of an eval-mode ReidModel; in memory only."""
    import io

    import onnx
    import torch

    from reid_deploy.deploy.quantize import library_step, quiet_library_logs
    from reid_deploy.inference.identity import weights_sha256

    m = spec.model
    example = torch.randn(2, m.input_channels, m.input_height, m.input_width)
    model = model.eval()
    step = f"ONNX export ({'dynamo' if opset >= 18 else 'TorchScript'} exporter, opset {opset})"
    with warnings.catch_warnings(), quiet_library_logs(), library_step(step):
        warnings.simplefilter("ignore")  # tracer/deprecation chatter; the result is checked below
        if opset >= 18:
            program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            proto, exporter = program.model_proto, "dynamo"
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto, exporter = onnx.load_from_string(buffer.getvalue()), "torchscript"
    # Shapes of intermediate tensors are for consumers to infer. The dynamo exporter also lists every
    # weight there (torch 2.11); a tool that rewrites a weight under its name (ONNX Runtime 1.30's quantizer
    # transposes a Gemm weight) leaves that copy stale, and its shape inference then fails on the conflict.
    del proto.graph.value_info[:]
    onnx.helper.set_model_props(proto, build_metadata(spec, weights_sha256(model.state_dict())))
    return proto, exporter


def check_graph(proto: Any, spec: Any) -> None:
    """onnx.checker, strict shape inference and the I/O contract; ModelFileError when one fails."""
    import onnx

    try:
        onnx.checker.check_model(proto)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelFileError(f"exported ONNX fails validation: {str(exc).splitlines()[0][:300]}") from None
    m = spec.model
    io_shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                 for v in [*inferred.graph.input, *inferred.graph.output]}
    expected = {INPUT_NAME: [m.input_channels, m.input_height, m.input_width], OUTPUT_NAME: [m.feat_dim]}
    for name, dims in expected.items():
        shape = io_shapes.get(name)
        if shape is None or shape[1:] != dims or not isinstance(shape[0], str):
            raise ModelFileError(f"exported ONNX {name} has shape {shape}; expected [batch, "
                                 f"{', '.join(map(str, dims))}] with a dynamic batch")


def parity_batches(model_spec: Any, spec: Any) -> list[tuple[str, np.ndarray]]:
    """Random batches of 1 and 7, and up to 16 real images (calibration, query, gallery or train folder)."""
    from reid_deploy.deploy.quantize import calibration_images
    from reid_deploy.inference.preprocess import Preprocess

    m = model_spec.model
    rng = np.random.default_rng(0)
    batches = [("random", rng.standard_normal((n, m.input_channels, m.input_height, m.input_width))
                .astype(np.float32)) for n in PARITY_BATCHES]
    data = spec.dataset
    for folder in (spec.export.cal_image_dir, data.query_dataset_dir, data.test_dataset_dir,
                   data.train_dataset_dir):
        if folder and Path(folder).is_dir():
            try:
                images = calibration_images(folder, REAL_IMAGES)
            except DataError:
                continue
            batches.append(("real", Preprocess.from_spec(model_spec).load_batch(images)))
            return batches
    log.warning("no image folder found for the real-image parity check (set export.cal_image_dir or "
                "dataset folders); checked on random inputs only")
    return batches


def check_parity(model: Any, model_bytes: bytes, batches: list[tuple[str, np.ndarray]]):
    """Compare PyTorch with ONNX Runtime on each batch; ModelFileError below cosine 0.9999."""
    import torch

    from reid_deploy.deploy.quantize import cosine_rows
    from reid_deploy.inference.extractors import OrtExtractor

    extractor = OrtExtractor(model_bytes, "exported model", device="cpu")
    results = []
    for name, x in batches:
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).float().numpy()
        out = extractor(x)
        results.append(Parity(name, len(x), float(np.abs(out - ref).max()), float(cosine_rows(ref, out).min())))
    worst = min(results, key=lambda p: p.min_cosine)
    if not worst.min_cosine >= MIN_COSINE:
        raise ModelFileError(f"ONNX parity check failed: min cosine {worst.min_cosine:.6f} < {MIN_COSINE} on "
                             f"{worst.inputs} batch {worst.batch} (max |diff| {worst.max_abs_diff:.3g}); "
                             f"nothing was written")
    return results, extractor


def _int8(kind: str, model_bytes: bytes, model_spec: Any, spec: Any, target: Path, key: str | None,
          batches: list[tuple[str, np.ndarray]], reference: np.ndarray) -> dict[str, Any]:
    from reid_deploy.deploy.quantize import (
        calibration_images,
        closeness,
        quantize_dynamic_bytes,
        quantize_static_bytes,
    )
    from reid_deploy.inference.extractors import OrtExtractor
    from reid_deploy.inference.identity import INT8_COSINE_KEY
    from reid_deploy.inference.metadata import add_metadata
    from reid_deploy.inference.preprocess import Preprocess

    cfg = spec.export
    if kind == "dynamic":
        data, path = quantize_dynamic_bytes(model_bytes), artefact_path(target, "int8")
    else:
        folder = cfg.cal_image_dir or spec.dataset.train_dataset_dir
        if not folder:
            raise SpecError("spec error: export.cal_image_dir is not set (static INT8 needs calibration "
                            "images; dataset.train_dataset_dir is used when set)")
        images = calibration_images(folder, cfg.cal_batches * cfg.cal_batch_size)
        data = quantize_static_bytes(model_bytes, Preprocess.from_spec(model_spec), images, cfg.cal_batch_size,
                                     cfg.cal_method)
        path = artefact_path(target, "qdq")
    extractor = OrtExtractor(data, f"{kind} INT8 model", device="cpu")
    feats = np.concatenate([extractor(x) for _, x in batches])
    info: dict[str, Any] = {"file": str(path), "images": f"{batches[0][0]} x{len(feats)}",
                            **closeness(reference, feats).as_dict()}
    if cfg.eval_map:
        from reid_deploy.evaluate.dataset_metrics import spec_map

        info["mAP"] = spec_map(extractor, spec)
    if kind == "static":  # the Q/DQ model is TensorRT's; the dynamic one is for ONNX Runtime only
        import onnx

        from reid_deploy.deploy.trt_support import check_tensorrt_support

        info["tensorrt"] = check_tensorrt_support(onnx.load_from_string(data)).as_dict()
    # the cosine travels with the file: an index built with another artefact of these weights quotes it
    write_model(add_metadata(data, {INT8_COSINE_KEY: f"{info['min_cosine']:.6f}"}), path, key)
    return info

