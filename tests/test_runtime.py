"""load_extractor: one interface over PyTorch and ONNX Runtime (plain or encrypted); clear errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.cli import main
from reid_deploy.crypto import encrypt_to_file
from reid_deploy.errors import BackendUnavailable, EncryptionError, ModelFileError
from reid_deploy.inference.extractors import OrtExtractor, TorchExtractor, load_extractor

KEY = "runtime-test-passphrase"
SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"


@pytest.fixture(scope="module")
def plain_onnx(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runtime")
    code = main(["-q", "export", "-e", str(SPEC), *tiny_overrides, f"results_dir={out}", "--no-encrypt",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=none"])
    assert code == 0
    return out / "export" / "model.onnx"


@pytest.fixture(scope="module")
def encrypted_onnx(plain_onnx) -> Path:
    path = plain_onnx.with_name("copy.onnx.enc")
    encrypt_to_file(plain_onnx.read_bytes(), path, KEY)
    return path


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 32)).astype(np.float32)


def test_plain_and_encrypted_onnx_agree_with_pytorch(plain_onnx, encrypted_onnx, tiny_checkpoint):
    x = _batch(5)
    reference = TorchExtractor.from_file(tiny_checkpoint, device="cpu")(x)
    for extractor in (load_extractor(plain_onnx, device="cpu"), load_extractor(encrypted_onnx, KEY, "cpu")):
        assert isinstance(extractor, OrtExtractor) and extractor.backend == "onnxruntime"
        assert extractor.providers == ["CPUExecutionProvider"] and extractor.feat_dim == 32
        feats = extractor(x)
        assert feats.dtype == np.float32 and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
        assert (feats * reference).sum(axis=1).min() >= 0.9999


def test_pth_gives_the_torch_extractor(tiny_checkpoint):
    assert load_extractor(tiny_checkpoint, device="cpu").backend == "pytorch"


def test_batches_are_split_by_max_batch_and_empty_is_fine(plain_onnx):
    extractor = load_extractor(plain_onnx, device="cpu")
    x = _batch(7, seed=1)
    whole = extractor(x)
    extractor.max_batch = 3
    np.testing.assert_allclose(extractor(x), whole, atol=1e-5)
    assert extractor(x[:0]).shape == (0, 32)


def test_preprocess_comes_from_metadata(plain_onnx, tiny_spec, demo_dir):
    from reid_deploy.data.market1501 import list_images
    from reid_deploy.inference.preprocess import Preprocess

    extractor = load_extractor(plain_onnx, device="cpu")
    assert extractor.preprocess == Preprocess.from_spec(tiny_spec)
    image = list_images(demo_dir / "query")[0]
    assert extractor.preprocess.load(image).shape == (3, 64, 32)


def test_decryption_stays_in_memory(encrypted_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_extractor(encrypted_onnx, KEY, "cpu")(_batch(2))
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in encrypted_onnx.parent.glob("*.onnx")) == ["model.onnx"]  # no new plaintext


def test_encrypted_without_or_with_wrong_key(encrypted_onnx):
    with pytest.raises(EncryptionError, match="is encrypted: give the key"):
        load_extractor(encrypted_onnx, device="cpu")
    with pytest.raises(EncryptionError, match="wrong key"):
        load_extractor(encrypted_onnx, "not the key", "cpu")


def test_plain_file_named_enc_is_refused(plain_onnx, tmp_path):
    fake = tmp_path / "model.onnx.enc"
    fake.write_bytes(plain_onnx.read_bytes())
    with pytest.raises(EncryptionError, match="not a reid-deploy encrypted file"):
        load_extractor(fake, KEY, "cpu")


def test_onnx_without_reid_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["fc_pred"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("fc_pred", TensorProto.FLOAT, ["b", 4])])
    path = tmp_path / "foreign.onnx"
    # IR 8 / opset 17 load in every supported ONNX Runtime (make_model's default IR is the onnx package's
    # newest, which a runtime older than that package refuses before the metadata is looked at)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(ModelFileError, match="lacks reid-deploy metadata"):
        load_extractor(path, device="cpu")


def test_damaged_onnx_and_unknown_suffix(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot load"):
        load_extractor(broken, device="cpu")
    other = tmp_path / "model.h5"
    other.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unsupported model file"):
        load_extractor(other)
    with pytest.raises(ModelFileError, match="not found"):
        load_extractor(tmp_path / "missing.onnx")


def test_cuda_request_without_cuda_provider(plain_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(BackendUnavailable, match="no CUDA provider"):
        load_extractor(plain_onnx, device="cuda")


def test_engine_on_cpu_is_refused_with_a_reason(tmp_path):
    engine = tmp_path / "model.gpu.fp16.engine"
    engine.write_bytes(b"engine")
    engine.with_name(engine.name + ".json").write_text(json.dumps({"min_batch_size": 1, "max_batch_size": 8}))
    with pytest.raises(BackendUnavailable, match="NVIDIA GPU"):
        load_extractor(engine, device="cpu")


# ---- uint8 batches normalised on the device, precision, compile, providers (issue 14) ----------------------


def test_uint8_extraction_equals_the_float_path_for_every_model_file(plain_onnx, encrypted_onnx, tiny_checkpoint,
                                                                     demo_dir):
    """Disk -> uint8 batches -> normalised by the extractor gives the features of float32 batches normalised
    by numpy (the path before uint8 batches), with and without flip averaging."""
    from reid_deploy.data.market1501 import list_images
    from reid_deploy.inference.features import extract_features

    paths = list_images(demo_dir / "query")[:10]
    for extractor in (TorchExtractor.from_file(tiny_checkpoint, device="cpu"), load_extractor(plain_onnx, device="cpu"),
                      load_extractor(encrypted_onnx, KEY, "cpu")):
        x = extractor.preprocess.load_batch(paths)
        plain = extractor(x)
        flipped = plain + extractor(np.ascontiguousarray(x[..., ::-1]))
        flipped /= np.linalg.norm(flipped, axis=1, keepdims=True)
        for flip, before in ((False, plain), (True, flipped)):
            now = extract_features(extractor, paths, batch_size=4, flip=flip).feats
            assert (now * before).sum(axis=1).min() >= 0.9999, (extractor.backend, flip)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cpu_falls_back_to_fp32_with_one_warning(tiny_checkpoint, precision, caplog):
    x = _batch(3)
    reference = TorchExtractor.from_file(tiny_checkpoint, device="cpu")(x)
    with caplog.at_level("WARNING", logger="reid"):
        extractor = load_extractor(tiny_checkpoint, device="cpu", precision=precision)
    assert extractor.precision == "fp32"
    assert [r.getMessage() for r in caplog.records] == [
        f"inference.precision={precision} runs on CUDA only: using fp32 on the CPU"]
    np.testing.assert_array_equal(extractor(x), reference)


def test_cli_with_bf16_on_cpu_warns_once_and_writes_features(cli, tiny_overrides, tiny_checkpoint, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on CUDA bf16 is used, not refused")
    out = tmp_path / "features.npz"
    result = cli("inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 "inference.precision=bf16", f"inference.output_file={out}")
    assert result.code == 0, result.err
    assert result.err.count("runs on CUDA only") == 1 and out.is_file()


def test_auto_precision_on_cpu_is_fp32_and_compile_is_eager_with_a_warning(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="reid"):
        assert load_extractor(tiny_checkpoint, device="cpu").precision == "fp32"
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="reid"):
        extractor = load_extractor(tiny_checkpoint, device="cpu", compile=True)
    assert not extractor.compiled
    assert [r.getMessage() for r in caplog.records] == [
        "inference.compile applies on CUDA only: running the model eagerly on the CPU"]


def test_torch_settings_asked_of_an_onnx_model_warn(plain_onnx, caplog):
    with caplog.at_level("WARNING", logger="reid"):
        load_extractor(plain_onnx, device="cpu", precision="fp16", compile=True)
    (record,) = caplog.records
    assert "inference.precision=fp16 and inference.compile=true apply to .pth models only" in record.getMessage()


def test_onnx_runtime_names_its_providers_and_a_gpu_it_does_not_use(plain_onnx, caplog, monkeypatch):
    import torch

    from reid_deploy.inference import extractors

    with caplog.at_level("INFO", logger="reid"):
        load_extractor(plain_onnx, device="cpu")  # the caller chose the CPU: nothing to report
        assert caplog.records == []
        if torch.cuda.is_available():
            pytest.skip("the GPU warning is checked on a CPU-only machine")
        load_extractor(plain_onnx)
    assert [r.getMessage() for r in caplog.records] == [f"ONNX Runtime runs {plain_onnx} on CPUExecutionProvider"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for both, expected in ((False, "no CUDA provider"), (True, "onnxruntime and onnxruntime-gpu are both installed")):
        monkeypatch.setattr(extractors, "_installed", lambda name, both=both: both or name == "onnxruntime")
        caplog.clear()
        with caplog.at_level("INFO", logger="reid"):
            extractors._report_providers("m.onnx", ["CPUExecutionProvider"])
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warning) == 1 and "torch sees a CUDA GPU but ONNX Runtime runs on the CPU" in warning[0]
        assert expected in warning[0] and "reid-deploy[gpu]" in warning[0]


def test_missing_onnx_runtime_names_the_extras(plain_onnx, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if neither extra were installed
    with pytest.raises(BackendUnavailable, match=r"ONNX Runtime is not installed: pip install 'reid-deploy\[cpu\]'"):
        load_extractor(plain_onnx, device="cpu")


def test_matmul_precision_is_scoped():
    import torch

    from reid_deploy.inference.extractors import _matmul_precision

    before = torch.get_float32_matmul_precision()
    with _matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_parity_to_fp32_is_logged(tiny_checkpoint, caplog):
    import torch

    extractor = TorchExtractor.from_file(tiny_checkpoint, device="cpu")
    x = torch.from_numpy(_batch(4))
    with torch.inference_mode(), caplog.at_level("INFO", logger="reid"):
        extractor._log_parity(x, extractor.model.eval()(x))
    (record,) = caplog.records
    assert "PyTorch fp32 on cpu: cosine to fp32 on the first batch of 4: min 1.000000" in record.getMessage()


@pytest.mark.gpu
@pytest.mark.parametrize("precision, compiled, bound", [("fp32", False, 0.9999), ("fp16", False, 0.999),
                                                        ("bf16", False, 0.99), ("fp16", True, 0.999)])
def test_cuda_precisions_match_cpu_fp32(tiny_checkpoint, demo_dir, precision, compiled, bound, caplog):
    import torch

    from reid_deploy.data.market1501 import list_images
    from reid_deploy.inference.features import extract_features

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    paths = list_images(demo_dir / "bounding_box_test")[:40]
    reference = extract_features(load_extractor(tiny_checkpoint, device="cpu"), paths, 16, flip=True).feats
    before = torch.get_float32_matmul_precision()
    extractor = load_extractor(tiny_checkpoint, device="cuda", precision=precision, compile=compiled)
    with caplog.at_level("INFO", logger="reid"):
        got = extract_features(extractor, paths, 16, num_workers=0, flip=True)
    assert torch.get_float32_matmul_precision() == before  # TF32 was scoped to the forward passes
    assert sum("cosine to fp32 on the first batch" in r.getMessage() for r in caplog.records) == 1
    assert got.feats.shape == reference.shape and (got.feats * reference).sum(axis=1).min() >= bound
