import numpy as np

from reid_deploy.inference.extractors import load_extractor


def test_tiny_checkpoint_extracts_unit_features(tiny_checkpoint, demo_dir):
    extractor = load_extractor(tiny_checkpoint)
    paths = sorted((demo_dir / "query").glob("*.jpg"))[:5]
    feats = extractor(extractor.preprocess.load_batch(paths))
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
