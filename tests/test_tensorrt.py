"""reid build-engine: TensorRT where it exists (marked, skipped with the reason elsewhere), the install hint
where it does not, and the ONNX Runtime CPU artefact everywhere."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.cli import main
from reid_deploy.crypto import MAGIC, decrypt_to_bytes
from reid_deploy.inference.extractors import TorchExtractor, load_extractor

KEY = "engine-test-passphrase"
SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return "TensorRT is not installed (pip install 'reid-deploy[tensorrt]' on an NVIDIA GPU machine)"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU visible"


TENSORRT_MISSING = _tensorrt_missing()


@pytest.fixture(scope="module")
def exported(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> Path:
    """Encrypted FP32 and Q/DQ exports of the tiny model; returns the export folder."""
    out = tmp_path_factory.mktemp("engine")
    key_file = out / "key"
    key_file.write_text(KEY)
    code = main(["-q", "export", "-e", str(SPEC), *tiny_overrides, f"results_dir={out}", "--key-file", str(key_file),
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=static", "export.cal_batches=2"])
    assert code == 0
    return out / "export"


def _build(cli, tiny_overrides, results: Path, *overrides: str):
    return cli("build-engine", "-e", SPEC, *tiny_overrides, f"results_dir={results}", f"encryption_key={KEY}",
               *overrides)


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 64, 32)).astype(np.float32)


def test_without_tensorrt_exits_2_with_install_hint(cli, tiny_overrides, exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as where TensorRT is absent
    result = _build(cli, tiny_overrides, tmp_path, f"build_engine.onnx_file={exported / 'model.onnx.enc'}")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "TensorRT is not installed" in line and "pip install 'reid-deploy[tensorrt]'" in line
    assert KEY not in result.err + result.out
    assert not any(p.suffix == ".engine" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("precision,bound", [("fp32", 0.9999), ("int8", 0.995)])
def test_onnxruntime_target_encrypted_and_close(cli, tiny_overrides, tiny_checkpoint, exported, tmp_path,
                                                 monkeypatch, precision, bound):
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    source = exported / "model.onnx.enc"
    result = _build(cli, tiny_overrides, tmp_path / "results", f"build_engine.onnx_file={source}",
                    "build_engine.target=onnxruntime", f"build_engine.precision={precision}")
    assert result.code == 0, result.err
    out = tmp_path / "results" / "build_engine" / "engines" / f"model.cpu.{precision}.onnx.enc"
    assert out.read_bytes()[:8] == MAGIC
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["precision"] == precision and sidecar["encrypted"] is True
    assert sidecar["source_sha256"] == hashlib.sha256(decrypt_to_bytes(source, KEY)).hexdigest()
    assert list(private.iterdir()) == []  # the optimised plaintext was written privately and removed
    assert not [p for p in tmp_path.rglob("*.onnx")]
    x = _batch(7)
    reference = TorchExtractor.from_file(tiny_checkpoint, device="cpu")(x)
    assert (load_extractor(out, KEY, "cpu")(x) * reference).sum(axis=1).min() >= bound
    assert KEY not in result.out + result.err + (tmp_path / "results" / "build_engine" / "status.json").read_text()


def test_onnxruntime_target_rejects_fp16(cli, tiny_overrides, exported, tmp_path):
    result = _build(cli, tiny_overrides, tmp_path, f"build_engine.onnx_file={exported / 'model.onnx.enc'}",
                    "build_engine.target=onnxruntime", "build_engine.precision=fp16")
    assert result.code == 2 and "fp32 or int8" in result.err


def test_missing_onnx_file_setting_exits_2(cli, tiny_overrides, tmp_path):
    result = _build(cli, tiny_overrides, tmp_path)
    assert result.code == 2 and "build_engine.onnx_file" in result.err


@pytest.mark.parametrize("precision,source,bound", [("fp32", "model.onnx.enc", 0.999),
                                                    ("fp16", "model.onnx.enc", 0.995),
                                                    ("int8", "model.qdq.onnx.enc", 0.98)])
@pytest.mark.tensorrt
@pytest.mark.skipif(TENSORRT_MISSING is not None, reason=str(TENSORRT_MISSING))
def test_tensorrt_engine_matches_pytorch(cli, tiny_overrides, tiny_checkpoint, exported, tmp_path, precision,
                                         source, bound):
    cache = tmp_path / "timing.cache"
    result = _build(cli, tiny_overrides, tmp_path, f"build_engine.onnx_file={exported / source}",
                    f"build_engine.precision={precision}", "build_engine.min_batch_size=1",
                    "build_engine.opt_batch_size=4", "build_engine.max_batch_size=8",
                    f"build_engine.timing_cache={cache}")
    assert result.code == 0, result.err
    (engine,) = (tmp_path / "build_engine" / "engines").glob(f"model.*.{precision}.engine")
    sidecar = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert sidecar["input_shape"] == [3, 64, 32] and sidecar["precision"] == precision
    assert (sidecar["min_batch_size"], sidecar["max_batch_size"]) == (1, 8) and sidecar["tensorrt_version"]
    assert cache.stat().st_size > 0
    assert not [p for p in tmp_path.rglob("*.onnx")]
    extractor = load_extractor(engine)
    assert extractor.backend == "tensorrt" and extractor.max_batch == 8
    torch_model = TorchExtractor.from_file(tiny_checkpoint, device="cpu")
    for n in (1, 7, 20):  # 20 > max_batch: split into 8 + 8 + 4
        x = _batch(n)
        assert (extractor(x) * torch_model(x)).sum(axis=1).min() >= bound
