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
