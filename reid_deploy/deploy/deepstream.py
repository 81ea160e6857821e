"""DeepStream configs for an exported model, computed from its spec: the ``[property]`` keys of a Gst-nvinfer
secondary GIE and the ``ReID:`` section of a Gst-nvtracker (NvDCF / NvDeepSORT) config.

Normalisation, both files: nvinfer feeds the network ``y = net-scale-factor * (x - offsets[c])`` with ``x`` the
0-255 pixel (Gst-nvinfer docs), nvtracker's ReID ``y = netScaleFactor * (x - offsets[c])`` (the ReID comments of
NVIDIA's config_tracker_NvDCF_accuracy.yml); the model expects ``(x / 255 - mean[c]) / std[c] =
(x - 255 mean[c]) / (255 std[c])``. So ``offsets`` is ``255 * pixel_mean`` per channel and the scale factor is
``1 / (255 * std)``: one number. When ``pixel_std`` differs per channel, the mean of its values is used — TAO's
ReIdentificationNet config does the same (0.226 for ImageNet's 0.229, 0.224, 0.225), the error on each channel
is ``std[c] / mean - 1`` (at most 1.3% there) and both files and one warning line say so. Both stretch each
object to the full input size (no aspect-ratio padding), as ``Preprocess`` does; nvinfer bilinear as it does
(``scaling-filter=1``), nvtracker's ReID section has no filter key.

nvinfer (key names from NVIDIA's gstnvinfer_property_parser.h and the Gst-nvinfer property table; the secondary
GIE keys as in deepstream_tao_apps' sgie_reidentificationnet_tao_config): ``process-mode=2`` runs it on the
objects of an upstream detector, ``operate-on-gie-id`` / ``operate-on-class-ids`` (written as examples) narrow
that to the detector's person class; the output ``fc_pred`` is a raw tensor (``network-type=100`` with
``output-tensor-meta=1``) read by the application.

nvtracker (key meanings from the ReID comments of config_tracker_NvDCF_accuracy.yml in NVIDIA-AI-IOT/
deepstream_reference_apps and the NvMultiObjectTracker API reference): ``reidType`` 2 is reid-based
re-association, NvDCF's accuracy preset (0 none, 1 NvDeepSORT association, 3 both: IReID.hpp's REID_TYPES);
``networkMode`` counts fp32=0, fp16=1, int8=2 (nvinfer: int8=1, fp16=2); ``inputOrder`` 0 is NCHW, the graph's
input, with ``inferDims`` [C, H, W]; ``colorFormat`` 0 is RGB (1 BGR), as ``Preprocess`` converts; ``keepAspc``
0 stretches each crop to ``inferDims`` as ``Preprocess`` does; ``addFeatureNormalization`` 1 would L2-normalise
the output, which ``fc_pred`` already is, so 0; ``outputReidTensor`` 1 attaches each object's feature to its
metadata; a missing ``modelEngineFile`` is built from ``onnxFile`` (IReID::initializeModel).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reid_deploy.console import log
from reid_deploy.inference.metadata import OUTPUT_NAME

NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values
TRACKER_NETWORK_MODE = {"fp32": 0, "fp16": 1, "int8": 2}  # nvtracker ReID's networkMode values
COLOR_FORMAT = {3: 0, 1: 2}  # input channels -> model-color-format (0 RGB, 2 GRAY)
SUFFIX = ".nvinfer.txt"
TRACKER_SUFFIX = ".tracker_reid.yml"
GIE_ID = 2  # this secondary GIE's gie-unique-id
DETECTOR_GIE_ID = 1  # the example operate-on-gie-id: a primary detector's usual gie-unique-id
PERSON_CLASS = 0  # the example operate-on-class-ids: the person class of COCO-trained detectors
REID_TYPE = 2  # reid-based re-association, as NVIDIA's NvDCF accuracy preset
REID_HISTORY_SIZE = 100  # features kept per target, as NVIDIA's NvDCF accuracy preset


@dataclass
class NvinferConfig:
    """The ``[property]`` keys in file order (``commented`` ones written as ``# key=value`` examples), comment
    lines above them, and the one-scale warning if any."""

    properties: dict[str, str]
    comments: list[str] = field(default_factory=list)
    commented: set[str] = field(default_factory=set)
    warning: str | None = None

    def text(self) -> str:
        lines = [f"# {c}" for c in self.comments] + ["[property]"]
        lines += [f"{'# ' if key in self.commented else ''}{key}={value}" for key, value in self.properties.items()]
        return "\n".join(lines) + "\n"


@dataclass
class TrackerReidConfig:
    """The ``ReID:`` keys in file order as (YAML value, where it comes from), written one a line with that source
    as a comment (``commented`` ones as ``# key: value`` examples), and comment lines above the section."""

    keys: dict[str, tuple[str, str]]
    comments: list[str] = field(default_factory=list)
    commented: set[str] = field(default_factory=set)

    def text(self) -> str:
        lines = [f"# {c}" for c in self.comments] + ["ReID:"]
        lines += [f"  {'# ' if key in self.commented else ''}{key}: {value}  # {source}"
                  for key, (value, source) in self.keys.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Normalisation:
    """DeepStream's per-channel ``offsets`` and its one scale factor for a spec, with the warning when the spec's
    per-channel std cannot be met exactly."""

    offsets: list[float]
    scale: float
    warning: str | None


def normalisation(model_spec: Any) -> Normalisation:
    """``offsets = 255 * pixel_mean`` and ``scale = 1 / (255 * mean of pixel_std)``."""
    data = model_spec.dataset
    std = list(data.pixel_std)
    mean_std = sum(std) / len(std)
    warning = None
    if len(set(std)) > 1:
        worst = max(abs(s / mean_std - 1) for s in std)
        warning = (f"dataset.pixel_std differs per channel ({', '.join(map(str, std))}) but DeepStream has one "
                   f"scale factor (nvinfer's net-scale-factor, nvtracker's netScaleFactor): it uses their mean "
                   f"{mean_std:.6g} (off by up to {100 * worst:.1f}% on a channel)")
    return Normalisation([255 * v for v in data.pixel_mean], 1 / (255 * mean_std), warning)


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _decrypt_step(onnx_name: str) -> str:
    return f"'reid decrypt {onnx_name} {onnx_name.removesuffix('.enc')} --key-file KEY'"


def nvinfer_config(model_spec: Any, precision: str, max_batch_size: int, onnx_name: str, encrypted: bool,
                   engine_file: str) -> NvinferConfig:
    """The snippet for the model ``onnx_name`` exported from ``model_spec``, run by nvinfer at ``precision``;
    ``engine_file`` is where ``reid build-engine`` writes its engine (written as a commented example)."""
    m = model_spec.model
    norm = normalisation(model_spec)
    config = NvinferConfig({}, [f"DeepStream nvinfer config for {onnx_name}, written by 'reid export' from its spec: "
                                f"net-scale-factor = 1/(255*pixel_std), offsets = 255*pixel_mean."])
    if norm.warning:
        config.warning = norm.warning
        config.comments.append(norm.warning + ".")
    config.comments.append("A secondary GIE (process-mode=2) on a detector's objects; its gie-unique-id must differ "
                           "from the detector's. Uncomment operate-on-gie-id (the detector's gie-unique-id) and "
                           "operate-on-class-ids (its person class) to embed persons only, input-object-min-width/"
                           "height to skip smaller boxes (example: a quarter of the input size).")
    props = config.properties
    props["gie-unique-id"] = str(GIE_ID)
    props["process-mode"] = "2"
    props["operate-on-gie-id"] = str(DETECTOR_GIE_ID)
    props["operate-on-class-ids"] = str(PERSON_CLASS)
    props["input-object-min-width"] = str(m.input_width // 4)
    props["input-object-min-height"] = str(m.input_height // 4)
    config.commented.update(("operate-on-gie-id", "operate-on-class-ids", "input-object-min-width",
                             "input-object-min-height"))
    props["net-scale-factor"] = repr(norm.scale)
    props["offsets"] = ";".join(_number(v) for v in norm.offsets)
    props["model-color-format"] = str(COLOR_FORMAT[m.input_channels])
    props["infer-dims"] = f"{m.input_channels};{m.input_height};{m.input_width}"
    if encrypted:
        config.comments.append(f"nvinfer reads plain ONNX only: {_decrypt_step(onnx_name)}, or use model-engine-file.")
        config.commented.add("onnx-file")
    props["onnx-file"] = onnx_name.removesuffix(".enc")
    config.comments.append("model-engine-file: the engine from 'reid build-engine' (<gpu> as in its name); "
                           "without it nvinfer builds its own from onnx-file. Paths are relative to this file.")
    props["model-engine-file"] = engine_file
    config.commented.add("model-engine-file")
    props["batch-size"] = str(max_batch_size)
    props["network-mode"] = str(NETWORK_MODE[precision])
    props["network-type"] = "100"
    props["output-blob-names"] = OUTPUT_NAME
    props["output-tensor-meta"] = "1"
    props["scaling-filter"] = "1"  # bilinear, as Preprocess resizes
    props["maintain-aspect-ratio"] = "0"
    return config


def tracker_reid_config(model_spec: Any, precision: str, max_batch_size: int, workspace_size: int, onnx_name: str,
                        encrypted: bool, engine_file: str) -> TrackerReidConfig:
    """The ``ReID:`` section for the RGB model ``onnx_name`` exported from ``model_spec``, run by nvtracker at
    ``precision``; ``engine_file`` is where ``reid build-engine`` writes its engine (a commented example)."""
    m = model_spec.model
    norm = normalisation(model_spec)
    plain = onnx_name.removesuffix(".enc")
    config = TrackerReidConfig({}, [f"nvtracker ReID section for {onnx_name}, written by 'reid export' from its "
                                    f"spec: put these keys under ReID: in the NvDCF or NvDeepSORT config "
                                    f"(ll-config-file)."])
    if norm.warning:
        config.comments.append(norm.warning + ".")
    if encrypted:
        config.comments.append(f"nvtracker reads plain ONNX only: {_decrypt_step(onnx_name)}, or use "
                               f"modelEngineFile.")
        config.commented.add("onnxFile")
    config.comments.append("modelEngineFile: the engine from 'reid build-engine' (<gpu> as in its name); without "
                           "it nvtracker builds one from onnxFile. Paths are as seen from this folder; nvtracker reads "
                           "relative ones from its config file's folder: keep the files beside it or write full "
                           "paths.")
    keys = config.keys
    keys["reidType"] = (str(REID_TYPE), "reid-based re-association (with TrajectoryManagement enableReAssoc: 1); "
                                        "1 for NvDeepSORT association, 3 for both")
    keys["batchSize"] = (str(max_batch_size), "build_engine.max_batch_size")
    keys["workspaceSize"] = (str(workspace_size), "build_engine.workspace_size, MiB")
    keys["reidFeatureSize"] = (str(m.feat_dim), "model.feat_dim")
    keys["reidHistorySize"] = (str(REID_HISTORY_SIZE), "features kept per target, as NVIDIA's NvDCF accuracy config")
    keys["inferDims"] = (f"[{m.input_channels}, {m.input_height}, {m.input_width}]",
                         "model.input_channels, input_height, input_width (CHW: inputOrder 0)")
    keys["networkMode"] = (str(TRACKER_NETWORK_MODE[precision]),
                           f"build_engine.precision {precision} (nvtracker: fp32=0, fp16=1, int8=2)")
    keys["inputOrder"] = ("0", "NCHW, the graph's input layout")
    keys["colorFormat"] = ("0", "RGB, as Preprocess converts")
    keys["offsets"] = (f"[{', '.join(_number(v) for v in norm.offsets)}]", "255 * dataset.pixel_mean")
    keys["netScaleFactor"] = (repr(norm.scale), "1 / (255 * mean of dataset.pixel_std)")
    keys["keepAspc"] = ("0", "stretched to inferDims: Preprocess resizes bilinear to the full input size")
    keys["addFeatureNormalization"] = ("0", f"{OUTPUT_NAME} is L2-normalised inside the network")
    keys["onnxFile"] = (json.dumps(plain), "the exported model")
    keys["modelEngineFile"] = (json.dumps(engine_file), "the engine from 'reid build-engine'")
    config.commented.add("modelEngineFile")
    keys["outputReidTensor"] = ("1", "attach each object's feature to its metadata for the application")
    return config


def write_deepstream_configs(spec: Any, model_spec: Any, target: Path, encrypted: bool) -> tuple[Path, Path | None]:
    """Write ``<name>.nvinfer.txt`` and, for an RGB model, ``<name>.tracker_reid.yml`` beside the exported
    ``target``, for ``build_engine.precision``; their paths (None: no tracker file)."""
    from reid_deploy.deploy.artefacts import artefact_path, default_engine_path
    from reid_deploy.files import write_text_atomic

    cfg = spec.build_engine
    model = artefact_path(target, "qdq") if cfg.precision == "int8" else target
    engine = os.path.relpath(Path(cfg.engine_file) if cfg.engine_file else
                             default_engine_path(spec, model, "<gpu>"), target.parent)
    nvinfer = nvinfer_config(model_spec, cfg.precision, cfg.max_batch_size, model.name, encrypted, engine)
    rgb = model_spec.model.input_channels == 3
    tracker = tracker_reid_config(model_spec, cfg.precision, cfg.max_batch_size, cfg.workspace_size, model.name,
                                  encrypted, engine) if rgb else None
    if cfg.precision == "int8" and spec.export.int8 not in ("static", "both"):
        needs = f"(int8) reads the Q/DQ model {model.name}: export with export.int8=static to write it."
        nvinfer.comments.append(f"network-mode=1 {needs}")
        if tracker:
            tracker.comments.append(f"networkMode: 2 {needs}")
    if nvinfer.warning:
        log.warning(nvinfer.warning)
    stem = target.name.partition(".onnx")[0]
    nvinfer_path = target.with_name(stem + SUFFIX)
    write_text_atomic(nvinfer_path, nvinfer.text())
    if tracker is None:
        log.warning("no nvtracker ReID config written: nvtracker feeds ReID models RGB or BGR, %s takes 1 channel",
                    model.name)
        return nvinfer_path, None
    tracker_path = target.with_name(stem + TRACKER_SUFFIX)
    write_text_atomic(tracker_path, tracker.text())
    return nvinfer_path, tracker_path
