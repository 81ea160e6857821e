"""The crops API: ``reid_deploy.load_extractor(path).embed(crops)`` gives the CLI's features for every model file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reid_deploy
from reid_deploy.cli import main
from reid_deploy.crypto import encrypt_to_file
from reid_deploy.errors import DataError
from reid_deploy.inference.features import load_features_npz

KEY = "api-test-passphrase"
SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Query and gallery folders of PNG crops of mixed sizes (Market-1501 names), with each file's pixels."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("crops")
    pixels = {}
    for split, count in (("query", 3), ("gallery", 6)):
        (root / split).mkdir()
        for i in range(count):
            height, width = int(rng.integers(12, 200)), int(rng.integers(6, 90))
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            path = root / split / f"{i % 2 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_01.png"
            Image.fromarray(array).save(path)
            pixels[str(path)] = array
    return root, pixels


@pytest.fixture(scope="module")
def models(tiny_overrides, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("api")
    assert main(["-q", "export", "-e", str(SPEC), *tiny_overrides, f"results_dir={out}", "--no-encrypt",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=none"]) == 0
    plain = out / "export" / "model.onnx"
    encrypted = plain.with_name("model.onnx.enc")
    encrypt_to_file(plain.read_bytes(), encrypted, KEY)
    return {"pth": tiny_checkpoint, "onnx": plain, "onnx.enc": encrypted}


@pytest.mark.parametrize("kind", ["pth", "onnx", "onnx.enc"])
def test_embed_on_arrays_equals_the_cli_features(kind, models, crops, cli, tiny_overrides, tmp_path, monkeypatch):
    root, pixels = crops
    monkeypatch.setenv("REID_KEY", KEY)
    out = tmp_path / "features.npz"
    result = cli("-q", "inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={models[kind]}",
                 f"inference.output_file={out}", f"inference.query_dataset={root / 'query'}",
                 f"inference.test_dataset={root / 'gallery'}")
    assert result.code == 0, result.err
    query, gallery = load_features_npz(out)
    paths = query.paths + gallery.paths
    assert sorted(paths) == sorted(pixels)
    cli_feats = np.concatenate([query.feats, gallery.feats])

    extractor = reid_deploy.load_extractor(models[kind], key=KEY)
    feats = extractor.embed([pixels[p] for p in paths])  # arrays of mixed sizes, in memory
    assert feats.dtype == np.float32 and feats.shape == cli_feats.shape
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert (feats * cli_feats).sum(axis=1).min() >= 0.9999
    if extractor.device.type == "cpu":  # same device and precision as the CLI: the same numbers
        np.testing.assert_allclose(feats, cli_feats, atol=1e-5)


def test_embed_takes_pil_images_and_paths_alike(models, crops):
    _, pixels = crops
    extractor = reid_deploy.load_extractor(models["pth"], device="cpu")
    paths = list(pixels)[:3]
    from_arrays = extractor.embed([pixels[p] for p in paths])
    np.testing.assert_allclose(extractor.embed([Image.fromarray(pixels[p]) for p in paths]), from_arrays, atol=1e-6)
    np.testing.assert_allclose(extractor.embed([Path(p) for p in paths]), from_arrays, atol=1e-6)
    gray = np.asarray(Image.fromarray(pixels[paths[0]]).convert("L"))
    assert extractor.embed([gray]).shape == (1, extractor.feat_dim)  # HxW grayscale is converted to RGB
    assert extractor.embed([]).shape == (0, extractor.feat_dim)


@pytest.mark.parametrize("crop, message", [
    (np.zeros((20, 10, 3), np.float32), "uint8 HxWx3"),
    (np.zeros((20, 10, 4), np.uint8), "uint8 HxWx3"),
    (np.zeros((0, 10, 3), np.uint8), "uint8 HxWx3"),
    (42, "a crop must be"),
])
def test_bad_crops_are_one_clear_error(models, crop, message):
    extractor = reid_deploy.load_extractor(models["pth"], device="cpu")
    with pytest.raises(DataError, match=message):
        extractor.embed([np.zeros((20, 10, 3), np.uint8), crop])


def test_import_stays_light():
    code = "import sys, reid_deploy; assert callable(reid_deploy.load_extractor); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
