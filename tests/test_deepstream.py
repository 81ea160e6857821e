"""The DeepStream configs: the nvinfer snippet (TAO's ReIdentificationNet numbers from the same spec values, a
secondary GIE, a GLib key file of documented keys) and the nvtracker ReID section, whose preprocessing run by hand
on the exported model gives the library's features; the one scale factor when pixel_std differs per channel."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reid_deploy.cli import main
from reid_deploy.deploy.deepstream import nvinfer_config, tracker_reid_config, write_deepstream_configs
from reid_deploy.spec import load_spec

SPECS = Path(__file__).parents[1] / "specs"
IMAGENET = ["dataset.pixel_mean=[0.485, 0.456, 0.406]", "dataset.pixel_std=[0.229, 0.224, 0.225]"]
# DeepStream's nvinfer config for TAO's ReIdentificationNet (ImageNet mean/std, 256x128, FP16)
TAO = {"net-scale-factor": 0.01735207357279195, "offsets": "123.675;116.28;103.53", "model-color-format": "0",
       "infer-dims": "3;256;128", "network-mode": "2", "output-blob-names": "fc_pred", "output-tensor-meta": "1"}
# The [property] keys nvinfer parses: NVIDIA's gstnvinfer_property_parser.h, as in the Gst-nvinfer property table
NVINFER_KEYS = {
    "gie-unique-id", "process-mode", "interval", "labelfile-path", "gpu-id", "secondary-reinfer-interval",
    "output-tensor-meta", "enable-dla", "use-dla-core", "batch-size", "tensor-meta-pool-size", "network-mode",
    "model-engine-file", "int8-calib-file", "workspace-size", "output-blob-names", "network-type",
    "force-implicit-batch-dim", "infer-dims", "output-io-formats", "layer-device-precision", "model-color-format",
    "net-scale-factor", "offsets", "mean-file", "maintain-aspect-ratio", "symmetric-padding", "scaling-filter",
    "scaling-compute-hw", "network-input-order", "input-tensor-from-meta", "custom-lib-path", "parse-bbox-func-name",
    "parse-bbox-instance-mask-func-name", "engine-create-func-name", "parse-classifier-func-name",
    "custom-network-config", "model-file", "proto-file", "uff-file", "uff-input-order", "uff-input-dims",
    "uff-input-blob-name", "tlt-encoded-model", "tlt-model-key", "onnx-file", "num-detected-classes",
    "cluster-mode", "classifier-type", "classifier-threshold", "classifier-async-mode", "segmentation-threshold",
    "segmentation-output-order", "output-instance-mask", "input-object-min-width", "input-object-min-height",
    "input-object-max-width", "input-object-max-height", "operate-on-gie-id", "operate-on-class-ids",
    "filter-out-class-ids"}
# The ReID keys of NVIDIA's tracker configs (config_tracker_NvDCF_accuracy.yml, deepstream_reference_apps)
TRACKER_REID_KEYS = {
    "reidType", "batchSize", "workspaceSize", "reidFeatureSize", "reidHistorySize", "inferDims", "networkMode",
    "inputOrder", "colorFormat", "offsets", "netScaleFactor", "keepAspc", "useVPICropScaler",
    "addFeatureNormalization", "minVisibility4GalleryUpdate", "tltEncodedModel", "tltModelKey", "onnxFile",
    "modelEngineFile", "outputReidTensor"}
KEY_LINE = re.compile(r"([a-z0-9-]+)=([^\s#\\][^#\\]*)")
COMMENTED_KEY_LINE = re.compile(r"# ([a-z0-9-]+)=(\S+)")
COMMENTED_REID_KEY = re.compile(r"^  # (\w+): (.+?)  # ", re.MULTILINE)
SOURCED_KEY_LINE = re.compile(r"  (# )?\w+: \S+( \S+)*  # \S.*")  # a key, its value and where it comes from
MIN_COSINE = 0.9999


def _spec(*overrides: str):
    return load_spec(SPECS / "market1501_swin_tiny.yaml", ["model.input_height=256", *overrides])


def _key_file(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(keys, commented ``# key=value`` examples) of a GLib key file with the one group ``[property]``, read
    strictly: each line is empty, a ``#`` comment, the group header or ``key=value`` without surrounding spaces
    (GLib has no comments after a value; ``\\`` would start an escape)."""
    keys, commented, groups = {}, {}, 0
    for line in text.splitlines():
        if line.startswith("#"):
            if example := COMMENTED_KEY_LINE.fullmatch(line):
                commented[example[1]] = example[2]
        elif line.startswith("["):
            assert line == "[property]" and groups == 0, line
            groups += 1
        elif line:
            pair = KEY_LINE.fullmatch(line)
            assert pair and groups == 1 and pair[1] not in keys and pair[2] == pair[2].rstrip(), line
            keys[pair[1]] = pair[2]
    assert groups == 1
    return keys, commented


def _properties(text: str) -> dict[str, str]:
    return _key_file(text)[0]


def _reid(text: str) -> tuple[dict, dict[str, str]]:
    """(the ``ReID:`` keys as YAML reads them, the commented ``# key: value`` examples)."""
    (section,) = yaml.safe_load(text).items()
    assert section[0] == "ReID"
    return section[1], dict(COMMENTED_REID_KEY.findall(text))


def test_tao_numbers_from_the_tao_spec_values():
    config = nvinfer_config(_spec(*IMAGENET), "fp16", 16, "model.onnx", False, "engines/model.x.fp16.engine")
    props = _properties(config.text())
    assert float(props.pop("net-scale-factor")) == pytest.approx(TAO["net-scale-factor"], rel=1e-12)
    assert {k: props[k] for k in TAO if k != "net-scale-factor"} == {k: v for k, v in TAO.items()
                                                                     if k != "net-scale-factor"}
    assert props["onnx-file"] == "model.onnx" and props["batch-size"] == "16" and props["network-type"] == "100"
    # one scale factor for three stds: the mean (0.226, TAO's value), said in the warning and the file
    assert "pixel_std differs per channel" in config.warning and "mean 0.226" in config.warning
    assert "up to 1.3%" in config.warning and f"# {config.warning}" in config.text()


def test_snippet_is_a_secondary_gie_of_documented_keys():
    text = nvinfer_config(_spec(*IMAGENET), "fp16", 16, "model.onnx", True, "e.engine").text()
    props, commented = _key_file(text)
    assert set(props) | set(commented) <= NVINFER_KEYS, (set(props) | set(commented)) - NVINFER_KEYS
    assert props["process-mode"] == "2" and props["gie-unique-id"] == "2"  # on the objects of an upstream GIE
    assert commented == {"operate-on-gie-id": "1", "operate-on-class-ids": "0", "input-object-min-width": "32",
                         "input-object-min-height": "64", "onnx-file": "model.onnx", "model-engine-file": "e.engine"}
    assert "operate-on-gie-id (the detector's gie-unique-id)" in text and "(its person class)" in text


def test_equal_stds_need_no_warning():
    config = nvinfer_config(_spec(), "fp32", 8, "model.onnx", False, "e.engine")  # the TAO spec: 0.5 everywhere
    props = _properties(config.text())
    assert config.warning is None and "differs" not in config.text()
    assert float(props["net-scale-factor"]) == pytest.approx(1 / 127.5, rel=1e-12)
    assert props["offsets"] == "127.5;127.5;127.5" and props["network-mode"] == "0"


def test_grayscale_model_gets_no_tracker_section(tmp_path):
    spec = _spec("model.input_channels=1", "dataset.pixel_mean=[0.5]", "dataset.pixel_std=[0.25]",
                 f"results_dir={tmp_path}")
    path, tracker = write_deepstream_configs(spec, spec, tmp_path / "export" / "model.onnx", encrypted=False)
    props = _properties(path.read_text())
    assert (props["model-color-format"], props["infer-dims"], props["offsets"]) == ("2", "1;256;128", "127.5")
    assert float(props["net-scale-factor"]) == pytest.approx(1 / (0.25 * 255), rel=1e-12)
    assert tracker is None and [p.name for p in path.parent.iterdir()] == ["model.nvinfer.txt"]  # nvtracker: RGB/BGR


def test_tracker_section_from_the_spec():
    text = tracker_reid_config(_spec(*IMAGENET), "fp16", 16, 1024, "model.onnx", False, "e.engine").text()
    reid, commented = _reid(text)
    assert set(reid) | set(commented) <= TRACKER_REID_KEYS, (set(reid) | set(commented)) - TRACKER_REID_KEYS
    assert reid["netScaleFactor"] == pytest.approx(TAO["net-scale-factor"], rel=1e-12)
    assert reid["offsets"] == [123.675, 116.28, 103.53] and reid["inferDims"] == [3, 256, 128]
    assert (reid["inputOrder"], reid["colorFormat"], reid["networkMode"]) == (0, 0, 1)  # NCHW, RGB, nvtracker's fp16
    assert (reid["reidType"], reid["reidFeatureSize"], reid["batchSize"], reid["workspaceSize"]) == (2, 1024, 16, 1024)
    assert (reid["keepAspc"], reid["addFeatureNormalization"], reid["outputReidTensor"]) == (0, 0, 1)
    assert reid["onnxFile"] == "model.onnx" and commented == {"modelEngineFile": '"e.engine"'}
    assert all(SOURCED_KEY_LINE.fullmatch(line) for line in text.splitlines() if line.startswith("  "))
    assert "# dataset.pixel_std differs per channel" in text and "mean 0.226" in text


@pytest.mark.parametrize("precision,mode,tracker_mode,model", [("fp32", "0", 0, "model.onnx"),
                                                              ("fp16", "2", 1, "model.onnx"),
                                                              ("int8", "1", 2, "model.qdq.onnx")])
def test_encrypted_export_gets_commented_paths(tmp_path, precision, mode, tracker_mode, model):
    spec = _spec(*IMAGENET, f"results_dir={tmp_path}", f"build_engine.precision={precision}", "export.int8=static")
    folder = tmp_path / "export"
    nvinfer, tracker = write_deepstream_configs(spec, spec, folder / "model.onnx.enc", encrypted=True)
    assert (nvinfer, tracker) == (folder / "model.nvinfer.txt", folder / "model.tracker_reid.yml")
    text = nvinfer.read_text()
    props = _properties(text)
    assert props["network-mode"] == mode and "onnx-file" not in props and "model-engine-file" not in props
    assert f"# onnx-file={model}\n" in text and f"reid decrypt {model}.enc {model}" in text  # nvinfer reads plain ONNX
    engine = f"../build_engine/engines/{model.removesuffix('.onnx')}.<gpu>.{precision}.engine"
    assert f"# model-engine-file={engine}\n" in text
    text = tracker.read_text()
    reid, commented = _reid(text)
    assert reid["networkMode"] == tracker_mode and "onnxFile" not in reid and "modelEngineFile" not in reid
    assert commented == {"onnxFile": f'"{model}"', "modelEngineFile": f'"{engine}"'}
    assert f"reid decrypt {model}.enc {model}" in text


@dataclass
class Export:
    dir: Path
    out: str
    err: str


def _export(checkpoint: Path, overrides: list[str], root: Path) -> Export:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", "-e", str(SPECS / "demo.yaml"), *overrides, f"results_dir={root}", "--no-encrypt",
                     f"export.checkpoint={checkpoint}", "export.int8=none"])
    assert code == 0, err.getvalue()
    return Export(root / "export", out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def imagenet_export(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> Export:
    """A plain export of the tiny model trained with ImageNet's per-channel std (the demo spec)."""
    return _export(tiny_checkpoint, tiny_overrides, tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def uniform_export(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> Export:
    """The same weights, saved with one std for all channels, exported."""
    from reid_deploy.model.checkpoint import load_model_file, save_checkpoint

    model, _ = load_model_file(tiny_checkpoint)
    spec = load_spec(SPECS / "demo.yaml", [*tiny_overrides, "dataset.pixel_std=[0.226, 0.226, 0.226]"])
    root = tmp_path_factory.mktemp("uniform")
    save_checkpoint(root / "uniform.pth", model, spec, epoch=0)
    return _export(root / "uniform.pth", tiny_overrides, root)


@pytest.fixture(scope="module")
def crops(demo_dir) -> list[np.ndarray]:
    """Query images and their upper 60% (another aspect ratio) as RGB arrays."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((demo_dir / "query").glob("*.jpg"))[:8]]
    return images + [image[:int(0.6 * len(image))] for image in images]


def _tracker_features(reid: dict, onnx_file: Path, crops: list[np.ndarray], scale=None) -> np.ndarray:
    """Features of RGB ``crops`` preprocessed as ``reid`` tells nvtracker, run by ONNX Runtime; ``scale``:
    per-channel factors in place of netScaleFactor."""
    import onnxruntime as ort

    dims = reid["inferDims"]
    channels, height, width = dims if reid["inputOrder"] == 0 else (dims[2], dims[0], dims[1])
    assert reid["keepAspc"] == 0 and channels == 3  # stretched, no padding
    scale = np.float32(reid["netScaleFactor"]) if scale is None else np.asarray(scale, np.float32)
    batch = []
    for crop in crops:
        pixels = np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR), np.float32)
        pixels = pixels[..., ::-1] if reid["colorFormat"] == 1 else pixels  # 0 RGB, 1 BGR
        y = scale * (pixels - np.asarray(reid["offsets"], np.float32))
        batch.append(y.transpose(2, 0, 1) if reid["inputOrder"] == 0 else y)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.stack(batch)})[0]


def _library_features(export: Export, crops: list[np.ndarray]) -> np.ndarray:
    from reid_deploy.inference.extractors import load_extractor

    return load_extractor(export.dir / "model.onnx", device="cpu").embed(crops)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_export_writes_both_files_beside_the_model(imagenet_export):
    nvinfer, tracker = imagenet_export.dir / "model.nvinfer.txt", imagenet_export.dir / "model.tracker_reid.yml"
    assert f"wrote {nvinfer} (DeepStream nvinfer config)" in imagenet_export.out
    assert f"wrote {tracker} (DeepStream nvtracker ReID config)" in imagenet_export.out
    props = _properties(nvinfer.read_text())
    assert (nvinfer.parent / props["onnx-file"]).is_file()  # relative to the config file, as nvinfer reads it
    assert props["infer-dims"] == "3;64;32" and props["offsets"] == "123.675;116.28;103.53"  # demo spec's values
    assert float(props["net-scale-factor"]) == pytest.approx(TAO["net-scale-factor"], rel=1e-12)
    reid, _ = _reid(tracker.read_text())
    assert (tracker.parent / reid["onnxFile"]).is_file() and reid["inferDims"] == [3, 64, 32]
    assert (reid["reidFeatureSize"], reid["networkMode"]) == (32, 1)  # model.feat_dim, build_engine fp16
    warnings = [line for line in imagenet_export.err.splitlines() if "pixel_std differs per channel" in line]
    assert len(warnings) == 1 and "mean 0.226" in warnings[0]  # one line for both files


def test_tracker_preprocessing_gives_the_library_features(uniform_export, crops):
    text = (uniform_export.dir / "model.tracker_reid.yml").read_text()
    reid, _ = _reid(text)
    assert "differs" not in text and "differs" not in uniform_export.err
    feats = _tracker_features(reid, uniform_export.dir / reid["onnxFile"], crops)
    assert feats.shape == (len(crops), reid["reidFeatureSize"])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)  # addFeatureNormalization: 0 is right
    assert _cosines(feats, _library_features(uniform_export, crops)).min() >= MIN_COSINE


def test_one_scale_factor_costs_what_the_warning_says(imagenet_export, crops):
    text = (imagenet_export.dir / "model.tracker_reid.yml").read_text()
    reid, _ = _reid(text)
    std = [0.229, 0.224, 0.225]  # the demo spec's pixel_std
    # each channel's input is scaled by netScaleFactor / (1 / (255 std[c])): the largest error is the warning's
    (percent,) = re.findall(r"# .*pixel_std differs per channel.* up to (\d+\.\d)% on a channel", text)
    assert float(percent) == round(100 * max(abs(reid["netScaleFactor"] * 255 * s - 1) for s in std), 1) == 1.3
    reference = _library_features(imagenet_export, crops)
    onnx_file = imagenet_export.dir / reid["onnxFile"]
    exact = _tracker_features(reid, onnx_file, crops, [1 / (255 * s) for s in std])
    assert _cosines(exact, reference).min() >= MIN_COSINE  # per-channel scaling is the library's preprocessing
    one_scale = _cosines(_tracker_features(reid, onnx_file, crops), reference)
    assert 0.999 < one_scale.min() and one_scale.max() < 1 - 1e-6  # the file's one scale: close, not equal
