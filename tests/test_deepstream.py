"""The DeepStream nvinfer config snippet: TAO's ReIdentificationNet numbers from the same spec values, the one
scale factor when pixel_std differs per channel, and the file ``reid export`` writes beside the model."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from reid_deploy.deploy.deepstream import nvinfer_config, write_nvinfer_config
from reid_deploy.spec import load_spec

SPECS = Path(__file__).parents[1] / "specs"
IMAGENET = ["dataset.pixel_mean=[0.485, 0.456, 0.406]", "dataset.pixel_std=[0.229, 0.224, 0.225]"]
# DeepStream's nvinfer config for TAO's ReIdentificationNet (ImageNet mean/std, 256x128, FP16)
TAO = {"net-scale-factor": 0.01735207357279195, "offsets": "123.675;116.28;103.53", "model-color-format": "0",
       "infer-dims": "3;256;128", "network-mode": "2", "output-blob-names": "fc_pred", "output-tensor-meta": "1"}


def _spec(*overrides: str):
    return load_spec(SPECS / "market1501_swin_tiny.yaml", ["model.input_height=256", *overrides])


def _properties(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return dict(parser["property"])


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


def test_equal_stds_need_no_warning():
    config = nvinfer_config(_spec(), "fp32", 8, "model.onnx", False, "e.engine")  # the TAO spec: 0.5 everywhere
    props = _properties(config.text())
    assert config.warning is None and "differs" not in config.text()
    assert float(props["net-scale-factor"]) == pytest.approx(1 / 127.5, rel=1e-12)
    assert props["offsets"] == "127.5;127.5;127.5" and props["network-mode"] == "0"


def test_grayscale_model():
    spec = _spec("model.input_channels=1", "dataset.pixel_mean=[0.5]", "dataset.pixel_std=[0.25]")
    props = _properties(nvinfer_config(spec, "fp16", 8, "model.onnx", False, "e.engine").text())
    assert (props["model-color-format"], props["infer-dims"], props["offsets"]) == ("2", "1;256;128", "127.5")
    assert float(props["net-scale-factor"]) == pytest.approx(1 / (0.25 * 255), rel=1e-12)


@pytest.mark.parametrize("precision,mode,model", [("fp32", "0", "model.onnx"), ("fp16", "2", "model.onnx"),
                                                  ("int8", "1", "model.qdq.onnx")])
def test_encrypted_export_gets_commented_paths(tmp_path, precision, mode, model):
    spec = _spec(*IMAGENET, f"results_dir={tmp_path}", f"build_engine.precision={precision}", "export.int8=static")
    path = write_nvinfer_config(spec, spec, tmp_path / "export" / "model.onnx.enc", encrypted=True)
    assert path == tmp_path / "export" / "model.nvinfer.txt"
    text = path.read_text()
    props = _properties(text)
    assert props["network-mode"] == mode and "onnx-file" not in props and "model-engine-file" not in props
    assert f"# onnx-file={model}\n" in text and f"reid decrypt {model}.enc {model}" in text  # nvinfer reads plain ONNX
    engine = f"../build_engine/engines/{model.removesuffix('.onnx')}.<gpu>.{precision}.engine"
    assert f"# model-engine-file={engine}\n" in text


def test_export_writes_the_snippet_beside_the_model(cli, tiny_overrides, tiny_checkpoint, tmp_path):
    result = cli("export", "-e", SPECS / "demo.yaml", *tiny_overrides, f"results_dir={tmp_path}", "--no-encrypt",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=none")
    assert result.code == 0, result.err
    path = tmp_path / "export" / "model.nvinfer.txt"
    assert f"wrote {path} (DeepStream nvinfer config)" in result.out
    props = _properties(path.read_text())
    assert (path.parent / props["onnx-file"]).is_file()  # relative to the config file, as nvinfer reads it
    assert props["infer-dims"] == "3;64;32" and props["offsets"] == "123.675;116.28;103.53"  # demo spec's values
    assert float(props["net-scale-factor"]) == pytest.approx(TAO["net-scale-factor"], rel=1e-12)
    warnings = [line for line in result.err.splitlines() if "pixel_std differs per channel" in line]
    assert len(warnings) == 1 and "mean 0.226" in warnings[0]
