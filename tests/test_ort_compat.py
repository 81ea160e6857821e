"""Every exported artefact loads in ONNX Runtime 1.18 (the oldest that deployments use: Triton 24.05) and gives
PyTorch's features there.

The artefacts (FP32 at opset 18 and 17, dynamic INT8, static Q/DQ, and the ONNX Runtime CPU builds of
``reid build-engine``) are written here by the installed stack; ``ort_compat_features.py`` then runs them in
a separate environment holding only onnxruntime 1.18 and numpy, whose Python ``make test`` names in
$REID_ORT118_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.cli import main

SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"
ORT118_PYTHON = os.environ.get("REID_ORT118_PYTHON")
# ONNX Runtime 1.18-1.20 load IR version <= 10 and ai.onnx opset <= 21
MAX_IR_VERSION, MAX_OPSET = 10, 21
FP32_MIN_COSINE, INT8_MIN_COSINE = 0.9999, 0.99

def _reid(*args: str | Path) -> None:
    assert main(["-q", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def artefacts(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Plain (unencrypted: the small environment has no reid_deploy) artefacts of the tiny model, by name."""
    out = tmp_path_factory.mktemp("ort118")
    overrides = [*tiny_overrides, f"results_dir={out}", f"export.checkpoint={tiny_checkpoint}"]
    export = out / "export"
    _reid("export", "-e", SPEC, *overrides, "export.int8=both", "export.cal_batches=2", "--no-encrypt")
    _reid("export", "-e", SPEC, *overrides, "export.int8=none", "export.opset=17",
          f"export.onnx_file={export / 'model17.onnx'}", "--no-encrypt")
    for precision in ("fp32", "int8"):
        _reid("build-engine", "-e", SPEC, *overrides, f"build_engine.onnx_file={export / 'model.onnx'}",
              "build_engine.target=onnxruntime", f"build_engine.precision={precision}")
    engines = out / "build_engine" / "engines"
    return {"fp32 opset 18": export / "model.onnx", "fp32 opset 17": export / "model17.onnx",
            "dynamic int8": export / "model.int8.onnx", "static int8 (Q/DQ)": export / "model.qdq.onnx",
            "onnxruntime cpu build fp32": engines / "model.cpu.fp32.onnx",
            "onnxruntime cpu build int8": engines / "model.cpu.int8.onnx"}


def test_artefacts_declare_what_onnx_runtime_1_18_loads(artefacts):
    import onnx

    for name, path in artefacts.items():
        model = onnx.load(path)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert model.ir_version <= MAX_IR_VERSION and opset <= MAX_OPSET, (name, model.ir_version, opset)


@pytest.mark.skipif(not ORT118_PYTHON, reason="needs $REID_ORT118_PYTHON, a Python with onnxruntime 1.18 and "
                    "numpy only ('make test' makes .venv-ort118 and sets it)")
def test_artefacts_load_in_onnx_runtime_1_18_and_match_pytorch(artefacts, tiny_checkpoint, tiny_spec, tmp_path):
    from reid_deploy.data.market1501 import list_images
    from reid_deploy.inference.extractors import TorchExtractor

    python = Path(ORT118_PYTHON)
    assert python.is_file(), f"REID_ORT118_PYTHON={python} does not exist: run 'make test' (it makes the venv)"
    torch_model = TorchExtractor.from_file(tiny_checkpoint, device="cpu")
    batch = torch_model.preprocess.load_batch(list_images(tiny_spec.dataset.query_dataset_dir)[:12])
    np.save(tmp_path / "input.npy", batch)
    (tmp_path / "models.json").write_text(json.dumps({name: str(path) for name, path in artefacts.items()}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(python), str(Path(__file__).with_name("ort_compat_features.py")), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runtime = json.loads((tmp_path / "runtime.json").read_text())
    assert runtime["onnxruntime"].startswith("1.18."), runtime
    assert runtime["errors"] == {}
    reference = torch_model(batch)
    with np.load(tmp_path / "features.npz") as features:
        assert sorted(features.files) == sorted(artefacts)
        for name in artefacts:
            feats = features[name].astype(np.float64)
            assert feats.shape == reference.shape, name
            cosine = (feats * reference).sum(axis=1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(reference, axis=1)
            bound = INT8_MIN_COSINE if "int8" in name else FP32_MIN_COSINE
            assert cosine.min() >= bound, (name, cosine.min())
