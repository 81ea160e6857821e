"""reid export: encrypted ONNX equal to PyTorch, graph contract, INT8 models, no plaintext, no key leaks."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.cli import main
from reid_deploy.crypto import MAGIC, decrypt_to_bytes
from reid_deploy.errors import ModelFileError
from reid_deploy.inference.extractors import TorchExtractor, load_extractor

KEY = "export-test-passphrase"
SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"
# Bounds for INT8 against FP32 on real images. Per-channel INT8 weights (and, for static, calibrated
# symmetric activations) perturb each feature by ~1e-2 relative; measured on this tiny model: dynamic
# min cosine 0.9996, static 0.998. The bounds leave room for kernel differences across CPUs while a
# broken quantization (wrong scale or zero point, unquantized garbage) gives cosines far below 0.9.
DYNAMIC_MIN_COSINE = 0.995
STATIC_MIN_COSINE = 0.99


@dataclass
class Exported:
    dir: Path
    tmp: Path
    out: str
    err: str
    code: int


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> Exported:
    """One encrypted export (key from --key-file) with both INT8 models; temp files redirected to ``tmp``."""
    root = tmp_path_factory.mktemp("export")
    key_file = root / "key"
    key_file.write_text(KEY)
    tmp = root / "tmp"
    tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp))
        mp.delenv("REID_KEY", raising=False)
        code, out, err = _run(["export", "-e", SPEC, *tiny_overrides, f"results_dir={root / 'results'}",
                               f"export.checkpoint={tiny_checkpoint}", "export.int8=both",
                               "export.cal_batches=2", "--key-file", key_file])
    return Exported(root / "results" / "export", tmp, out, err, code)


def test_export_writes_only_encrypted_models(exported):
    assert exported.code == 0, exported.err
    names = sorted(p.name for p in exported.dir.iterdir())
    assert names == ["experiment.yaml", "model.int8.onnx.enc", "model.nvinfer.txt", "model.onnx.enc",
                     "model.qdq.onnx.enc", "model.tracker_reid.yml", "status.json"]
    for name in names:
        if name.endswith(".enc"):
            assert (exported.dir / name).read_bytes()[:8] == MAGIC


def test_no_plaintext_onnx_left_anywhere(exported):
    assert list(exported.tmp.iterdir()) == []  # private temp folders were removed
    onnx_files = [p for p in exported.dir.parent.rglob("*") if p.is_file() and not p.name.endswith(
        (".enc", ".yaml", ".json", ".nvinfer.txt", ".tracker_reid.yml"))]
    assert onnx_files == []


@pytest.mark.parametrize("batch", [1, 7])
def test_encrypted_onnx_features_equal_pytorch(exported, tiny_checkpoint, tiny_spec, batch):
    from reid_deploy.inference.preprocess import Preprocess

    onnx_model = load_extractor(exported.dir / "model.onnx.enc", key=KEY, device="cpu")
    torch_model = TorchExtractor.from_file(tiny_checkpoint, device="cpu")
    assert onnx_model.preprocess == Preprocess.from_spec(tiny_spec) == torch_model.preprocess
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 32)).astype(np.float32)
    a, b = torch_model(x), onnx_model(x)
    assert a.shape == b.shape == (batch, 32)
    assert (a * b).sum(axis=1).min() >= 0.9999


def test_graph_contract_and_metadata(exported, tiny_spec):
    import onnx

    from reid_deploy.spec import spec_hash

    model = onnx.load_from_string(decrypt_to_bytes(exported.dir / "model.onnx.enc", KEY))
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # no shape annotations to go stale: ONNX Runtime 1.30's quantizer transposed a weight listed there and
    # its shape inference then failed ("Inferred shape and existing shape differ")
    assert len(model.graph.value_info) == 0
    (inp,), (out,) = model.graph.input, model.graph.output
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert inp.name == "input" and isinstance(dims(inp)[0], str) and dims(inp)[1:] == [3, 64, 32]
    assert out.name == "fc_pred" and isinstance(dims(out)[0], str) and dims(out)[1:] == [32]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["backbone"] == tiny_spec.model.backbone and props["feat_dim"] == "32"
    assert (props["input_height"], props["input_width"]) == ("64", "32")
    assert json.loads(props["pixel_mean"]) == list(tiny_spec.dataset.pixel_mean)
    assert json.loads(props["pixel_std"]) == list(tiny_spec.dataset.pixel_std)
    assert props["neck_feat"] == tiny_spec.model.neck_feat and props["spec_hash"] == spec_hash(tiny_spec)


def test_parity_printed_and_recorded(exported):
    for text in ("parity random batch 1", "parity random batch 7", "parity real batch 16", "min cosine"):
        assert text in exported.out
    (entry,) = [json.loads(line) for line in (exported.dir / "status.json").read_text().splitlines()]
    assert {p["inputs"] for p in entry["parity"]} == {"random", "real"}
    assert all(p["min_cosine"] >= 0.9999 for p in entry["parity"])
    assert entry["encrypted"] is True and entry["opset"] >= 18 and entry["exporter"] == "dynamo"


def test_int8_models_run_and_stay_close(exported, tiny_spec):
    import onnx

    from reid_deploy.data.market1501 import list_images

    fp32 = load_extractor(exported.dir / "model.onnx.enc", key=KEY, device="cpu")
    images = fp32.preprocess.load_batch(list_images(tiny_spec.dataset.query_dataset_dir)[:12])
    reference = fp32(images)
    for name, bound in (("model.int8.onnx.enc", DYNAMIC_MIN_COSINE), ("model.qdq.onnx.enc", STATIC_MIN_COSINE)):
        int8 = load_extractor(exported.dir / name, key=KEY, device="cpu")
        feats = int8(images)
        assert feats.shape == reference.shape
        assert (feats * reference).sum(axis=1).min() >= bound, name
    qdq = onnx.load_from_string(decrypt_to_bytes(exported.dir / "model.qdq.onnx.enc", KEY))
    quant = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert quant, "static INT8 must be a Q/DQ model"
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert all(not zero_points[n.input[2]].any() for n in quant if len(n.input) > 2)  # symmetric: TensorRT
    # TensorRT's parser takes only INT8 DequantizeLinear inputs: no INT32 (quantized bias) initializers
    dequantized = {n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    assert {zero_points[name].dtype for name in dequantized if name in zero_points} == {np.dtype(np.int8)}
    status = json.loads((exported.dir / "status.json").read_text())
    assert status["int8"]["dynamic"]["min_cosine"] >= DYNAMIC_MIN_COSINE
    assert status["int8"]["static"]["min_cosine"] >= STATIC_MIN_COSINE


def test_int8_models_keep_the_embedding_in_fp32(exported):
    """The last linear layer (embedding, BNNeck folded in) stays FP32; every other MatMul weight is INT8."""
    import onnx

    from reid_deploy.deploy.quantize import linear_layers

    fp32 = onnx.load_from_string(decrypt_to_bytes(exported.dir / "model.onnx.enc", KEY))
    *backbone, embedding = linear_layers(fp32)
    dynamic = onnx.load_from_string(decrypt_to_bytes(exported.dir / "model.int8.onnx.enc", KEY))
    assert sum(n.op_type == "MatMulInteger" for n in dynamic.graph.node) == len(backbone) > 0
    qdq = onnx.load_from_string(decrypt_to_bytes(exported.dir / "model.qdq.onnx.enc", KEY))
    dequantized = {out for n in qdq.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    (kept,) = [n for n in qdq.graph.node if n.name == embedding.name]
    assert not dequantized & set(kept.input)
    assert any(dequantized & set(n.input) for n in qdq.graph.node if n.name == backbone[-1].name)


def test_convolutional_model_gets_no_dynamic_int8(cli, tiny_overrides, tmp_path, monkeypatch):
    """A ResNet has no MatMul layers besides its embedding: export says so and writes none; the CPU int8
    build is refused with one line."""
    from reid_deploy.model.checkpoint import save_checkpoint
    from reid_deploy.model.reid_model import build_model
    from reid_deploy.spec import load_spec

    overrides = [*tiny_overrides, "model.backbone=resnet_50", "model.backbone_args={layers: [1, 1, 1, 1]}",
                 f"results_dir={tmp_path}"]
    spec = load_spec(SPEC, overrides)
    checkpoint = tmp_path / "resnet.pth"
    save_checkpoint(checkpoint, build_model(spec).eval(), spec, epoch=0)
    monkeypatch.delenv("REID_KEY", raising=False)
    result = cli("export", "-e", SPEC, *overrides, f"export.checkpoint={checkpoint}", "export.int8=dynamic",
                 "--no-encrypt")
    assert result.code == 0, result.err
    assert "no dynamic INT8 model written" in result.err and "convolutional backbone" in result.err
    assert sorted(p.name for p in (tmp_path / "export").glob("*.onnx")) == ["model.onnx"]
    result = cli("build-engine", "-e", SPEC, *overrides, f"build_engine.onnx_file={tmp_path / 'export' / 'model.onnx'}",
                 "build_engine.target=onnxruntime", "build_engine.precision=int8")
    result.user_error("build_engine.precision=int8", "no MatMul layers")


@pytest.mark.parametrize("method", ["percentile", "entropy", "minmax"])
def test_static_int8_calibrates_on_a_ragged_image_count(cli, tiny_overrides, tiny_checkpoint, demo_dir, tmp_path,
                                                         method):
    """7 calibration images in batches of 4: every calibration method works (ORT's histogram calibrators
    need equal batches)."""
    import shutil

    from reid_deploy.data.market1501 import list_images

    cal = tmp_path / "cal"
    cal.mkdir()
    for path in list_images(demo_dir / "bounding_box_train")[:7]:
        shutil.copy(path, cal / path.name)
    result = cli("export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=static", f"export.cal_image_dir={cal}",
                 "export.cal_batch_size=4", f"export.cal_method={method}", "--no-encrypt")
    assert result.code == 0, result.err
    assert "int8 static: cosine to FP32" in result.out and (tmp_path / "export" / "model.qdq.onnx").is_file()


def test_key_never_leaks(tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch):
    """Key from the spec: redacted in experiment.yaml, absent from status.json and output; opset 17 path."""
    monkeypatch.delenv("REID_KEY", raising=False)
    secret = "spec-key-that-must-not-leak"
    code, out, err = _run(["export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}",
                           f"export.checkpoint={tiny_checkpoint}", "export.int8=none", "export.opset=17",
                           f"encryption_key={secret}"])
    assert code == 0, err
    for path in (tmp_path / "export").iterdir():
        assert secret.encode() not in path.read_bytes()
    assert secret not in out + err
    assert "***redacted***" in (tmp_path / "export" / "experiment.yaml").read_text()
    assert "torchscript exporter, opset 17" in out
    onnx_model = load_extractor(tmp_path / "export" / "model.onnx.enc", key=secret, device="cpu")
    x = np.random.default_rng(3).standard_normal((7, 3, 64, 32)).astype(np.float32)
    ref = TorchExtractor.from_file(tiny_checkpoint, device="cpu")(x)
    assert (onnx_model(x) * ref).sum(axis=1).min() >= 0.9999


def test_no_encrypt_writes_plain_onnx_even_with_a_key(cli, tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("REID_KEY", KEY)
    result = cli("export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=none", "--no-encrypt")
    assert result.code == 0, result.err
    assert (tmp_path / "export" / "model.onnx").read_bytes()[:8] != MAGIC
    assert "NOT encrypted" in result.out


def test_enc_name_without_key_exits_2(cli, tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("REID_KEY", raising=False)
    result = cli("export", "-e", SPEC, *tiny_overrides, f"export.checkpoint={tiny_checkpoint}",
                 f"export.onnx_file={tmp_path / 'm.onnx.enc'}")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "no key" in result.err


def test_parity_failure_exits_2_and_writes_nothing(cli, tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch):
    from reid_deploy.inference.extractors import OrtExtractor

    real_run = OrtExtractor.run

    def drifting(self, batch):
        feats = real_run(self, batch) + 0.05 * np.random.default_rng(0).standard_normal((len(batch), 32))
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(OrtExtractor, "run", drifting)
    result = cli("export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=none", "--no-encrypt")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "parity check failed" in line and "min cosine" in line
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_missing_checkpoint_exits_2(cli, tiny_overrides):
    result = cli("export", "-e", SPEC, *tiny_overrides, "--no-encrypt")
    assert result.code == 2 and "export.checkpoint" in result.err


def test_export_without_key_needs_no_encrypt(cli, tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("REID_KEY", raising=False)
    result = cli("export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}",
                 f"export.checkpoint={tiny_checkpoint}")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "no key given" in line and "--no-encrypt" in line
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_export_of_an_exported_model_names_the_mistake(cli, tiny_overrides, tmp_path):
    onnx_file = tmp_path / "model.onnx.enc"
    onnx_file.write_bytes(b"whatever")
    result = cli("export", "-e", SPEC, *tiny_overrides, f"export.checkpoint={onnx_file}", "--no-encrypt")
    assert result.code == 2 and "not an exported model" in result.err


@pytest.mark.parametrize(("module", "function", "step"), [
    ("torch.onnx", "export", "ONNX export (dynamo exporter, opset 18)"),
    ("onnxruntime.quantization", "quantize_dynamic", "dynamic INT8 (ONNX Runtime's quantize_dynamic)"),
])
def test_library_failure_is_one_line_with_versions(cli, tiny_overrides, tiny_checkpoint, tmp_path, monkeypatch,
                                                   module, function, step):
    """A failure inside torch.onnx or ONNX Runtime's tools names the step and the library versions (exit 2);
    --debug shows the library's own traceback."""
    import importlib
    from importlib.metadata import version

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside the library\nsecond line")

    monkeypatch.setattr(importlib.import_module(module), function, broken)
    args = ["export", "-e", SPEC, *tiny_overrides, f"results_dir={tmp_path}", f"export.checkpoint={tiny_checkpoint}",
            "export.int8=dynamic", "--no-encrypt"]
    result = cli(*args)
    assert result.code == 2 and "Traceback" not in result.err, result.err
    (line,) = [line for line in result.err.splitlines() if line.startswith("error:")]  # after any warnings
    assert step in line and "RuntimeError: simulated failure inside the library" in line
    for name in ("torch", "onnx", "onnxruntime"):
        assert f"{name} {version(name)}" in line
    with pytest.raises(ModelFileError) as raised:
        main(["--debug", *map(str, args)])
    assert isinstance(raised.value.__cause__, RuntimeError)
