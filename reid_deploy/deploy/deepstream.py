"""A DeepStream ``nvinfer`` config snippet for an exported model, computed from its spec.

nvinfer feeds the network ``y = net-scale-factor * (x - offsets[c])`` with ``x`` the 0-255 pixel; the
model expects ``(x / 255 - mean[c]) / std[c] = (x - 255 mean[c]) / (255 std[c])``. So ``offsets`` is
``255 * pixel_mean`` per channel and ``net-scale-factor`` is ``1 / (255 * std)``: one number. When
``pixel_std`` differs per channel, the mean of its values is used — TAO's ReIdentificationNet config does
the same (0.226 for ImageNet's 0.229, 0.224, 0.225), the error on each channel is ``std[c] / mean - 1``
(at most 1.3% there) and the file and one warning line say so. Resizing is bilinear to the full input size
(no aspect-ratio padding), as ``Preprocess`` does; the output ``fc_pred`` is a raw tensor
(``network-type=100`` with ``output-tensor-meta=1``), read by the application or nvtracker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reid_deploy.console import log
from reid_deploy.inference.metadata import OUTPUT_NAME

NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values
COLOR_FORMAT = {3: 0, 1: 2}  # input channels -> model-color-format (0 RGB, 2 GRAY)
SUFFIX = ".nvinfer.txt"


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


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def nvinfer_config(model_spec: Any, precision: str, max_batch_size: int, onnx_name: str, encrypted: bool,
                   engine_file: str) -> NvinferConfig:
    """The snippet for the model ``onnx_name`` exported from ``model_spec``, run by nvinfer at ``precision``;
    ``engine_file`` is where ``reid build-engine`` writes its engine (written as a commented example)."""
    m, data = model_spec.model, model_spec.dataset
    std = list(data.pixel_std)
    scale_std = sum(std) / len(std)
    config = NvinferConfig({}, [f"DeepStream nvinfer config for {onnx_name}, written by 'reid export' from its spec: "
                                f"net-scale-factor = 1/(255*pixel_std), offsets = 255*pixel_mean."])
    if len(set(std)) > 1:
        worst = max(abs(s / scale_std - 1) for s in std)
        config.warning = (f"dataset.pixel_std differs per channel ({', '.join(map(str, std))}) but nvinfer has one "
                          f"net-scale-factor: it uses their mean {scale_std:.6g} (off by up to {100 * worst:.1f}% "
                          f"on a channel)")
        config.comments.append(config.warning + ".")
    props = config.properties
    props["net-scale-factor"] = repr(1 / (255 * scale_std))
    props["offsets"] = ";".join(_number(255 * v) for v in data.pixel_mean)
    props["model-color-format"] = str(COLOR_FORMAT[m.input_channels])
    props["infer-dims"] = f"{m.input_channels};{m.input_height};{m.input_width}"
    if encrypted:
        config.comments.append(f"nvinfer reads plain ONNX only: 'reid decrypt {onnx_name} "
                               f"{onnx_name.removesuffix('.enc')} --key-file KEY', or use model-engine-file.")
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


def write_nvinfer_config(spec: Any, model_spec: Any, target: Path, encrypted: bool) -> Path:
    """Write ``<name>.nvinfer.txt`` beside the exported ``target``, for ``build_engine.precision``."""
    from reid_deploy.deploy.artefacts import artefact_path, default_engine_path
    from reid_deploy.files import write_text_atomic

    cfg = spec.build_engine
    model = artefact_path(target, "qdq") if cfg.precision == "int8" else target
    engine = Path(cfg.engine_file) if cfg.engine_file else default_engine_path(spec, model, "<gpu>")
    config = nvinfer_config(model_spec, cfg.precision, cfg.max_batch_size, model.name, encrypted,
                            os.path.relpath(engine, target.parent))
    if cfg.precision == "int8" and spec.export.int8 not in ("static", "both"):
        config.comments.append(f"network-mode=1 (int8) reads the Q/DQ model {model.name}: export with "
                               f"export.int8=static to write it.")
    if config.warning:
        log.warning(config.warning)
    path = target.with_name(target.name.partition(".onnx")[0] + SUFFIX)
    write_text_atomic(path, config.text())
    return path
