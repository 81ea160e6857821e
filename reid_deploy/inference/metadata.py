"""What an exported model carries about itself: the ONNX metadata_props (and the engine sidecar JSON).

Every deployment file says how its input was made, so that ``load_extractor`` rebuilds the one
``Preprocess`` without a spec: RGB, resized bilinear to input_height x input_width, scaled to [0, 1],
then ``(x - pixel_mean) / pixel_std`` per channel, float32 NCHW. It also names the weights it came from
(``weights_sha256``) and, for INT8 models, how close their features were to FP32 at export (see
``inference.identity``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reid_deploy.errors import ModelFileError
from reid_deploy.inference.preprocess import Preprocess

INPUT_NAME = "input"
OUTPUT_NAME = "fc_pred"
_REQUIRED = ("input_height", "input_width", "pixel_mean", "pixel_std", "feat_dim")


def build_metadata(spec: Any, weights_sha256: str) -> dict[str, str]:
    """The metadata_props of a model exported from ``spec`` with weights whose hash is ``weights_sha256``
    (``inference.identity.weights_sha256``; no key, nothing secret)."""
    from reid_deploy.inference.identity import WEIGHTS_KEY
    from reid_deploy.spec import spec_hash

    m, data = spec.model, spec.dataset
    return {
        "producer": "reid-deploy",
        WEIGHTS_KEY: weights_sha256,
        "backbone": m.backbone,
        "input_channels": str(m.input_channels),
        "input_height": str(m.input_height),
        "input_width": str(m.input_width),
        "pixel_mean": json.dumps(list(data.pixel_mean)),
        "pixel_std": json.dumps(list(data.pixel_std)),
        "feat_dim": str(m.feat_dim),
        "neck_feat": m.neck_feat,
        "spec_hash": spec_hash(spec),
        "input_format": "float32 NCHW: RGB resized bilinear to input_height x input_width, /255, "
                        "then (x - pixel_mean) / pixel_std per channel",
        "output_format": "float32 [batch, feat_dim], L2-normalised",
    }


def read_metadata(props: Mapping[str, str], source: str) -> tuple[Preprocess, int]:
    """``Preprocess`` and ``feat_dim`` from metadata; ModelFileError naming what is missing."""
    missing = [k for k in _REQUIRED if k not in props]
    if missing:
        raise ModelFileError(f"{source} lacks reid-deploy metadata ({', '.join(missing)}); export it with "
                             f"'reid export'")
    try:
        mean, std = tuple(json.loads(props["pixel_mean"])), tuple(json.loads(props["pixel_std"]))
        preprocess = Preprocess(int(props["input_height"]), int(props["input_width"]),
                                tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return preprocess, int(props["feat_dim"])
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{source} has malformed reid-deploy metadata: {exc}") from None


def add_metadata(model: bytes, props: Mapping[str, str]) -> bytes:
    """ONNX bytes with ``props`` added to their metadata_props (replacing keys already there)."""
    import onnx

    proto = onnx.load_from_string(model)
    merged = {p.key: p.value for p in proto.metadata_props} | dict(props)
    onnx.helper.set_model_props(proto, merged)
    return proto.SerializeToString()
