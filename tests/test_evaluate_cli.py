"""``reid inference`` and ``reid evaluate`` end to end on the tiny model and the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.data.market1501 import read_eval
from reid_deploy.evaluate.metrics import compute_metrics, squared_euclidean
from reid_deploy.inference.features import LabelledFeatures, load_features_npz, save_features_npz

SPEC = "specs/demo.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inference_npz(tiny_overrides, tiny_checkpoint, tmp_path_factory):
    """Features of the demo query and gallery written by ``reid inference`` (.npz)."""
    from reid_deploy.cli import main

    out = tmp_path_factory.mktemp("inference") / "features.npz"
    code = main(["-q", "inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 f"inference.output_file={out}"])
    assert code == 0
    return out


def test_inference_writes_npz(inference_npz, demo_dir, tiny_spec):
    query_records, gallery_records = read_eval(demo_dir / "query", demo_dir / "bounding_box_test")
    with np.load(inference_npz, allow_pickle=False) as data:
        for name, records in (("query", query_records), ("gallery", gallery_records)):
            feats = data[f"{name}_feats"]
            assert feats.dtype == np.float32 and feats.shape == (len(records), tiny_spec.model.feat_dim)
            np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
            assert data[f"{name}_paths"].tolist() == [r.path for r in records]
            assert data[f"{name}_pids"].tolist() == [r.pid for r in records]
            assert data[f"{name}_camids"].tolist() == [r.camid for r in records]
    assert 0 in data_pids(inference_npz, "gallery")  # distractors kept, junk dropped
    assert -1 not in data_pids(inference_npz, "gallery")


def data_pids(path: Path, split: str) -> list[int]:
    with np.load(path) as data:
        return data[f"{split}_pids"].tolist()


def test_inference_writes_tao_json(cli, tiny_overrides, tiny_checkpoint, inference_npz, tmp_path):
    out = tmp_path / "features.json"
    result = cli("-q", "inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 f"inference.output_file={out}", f"inference.results_dir={tmp_path / 'run'}")
    assert result.code == 0, result.err
    entries = json.loads(out.read_text())
    assert all(set(e) == {"img_path", "embedding"} for e in entries)
    query, gallery = load_features_npz(inference_npz)
    assert [e["img_path"] for e in entries] == query.paths + gallery.paths
    np.testing.assert_allclose(np.array([e["embedding"] for e in entries], np.float32),
                               np.concatenate([query.feats, gallery.feats]), atol=1e-5)
    assert (tmp_path / "run" / "status.json").is_file()


def test_evaluate_with_checkpoint(cli, tiny_overrides, tiny_checkpoint, inference_npz, tmp_path):
    out = tmp_path / "eval"
    result = cli("-q", "evaluate", "-e", SPEC, *tiny_overrides, f"evaluate.checkpoint={tiny_checkpoint}",
                 f"evaluate.results_dir={out}", "re_ranking.re_ranking=false", "re_ranking.num_query=3",
                 "re_ranking.max_rank=5")
    assert result.code == 0, result.err
    assert "mAP" in result.out and "Rank-1" in result.out
    metrics = json.loads((out / "metrics.json").read_text())
    # The same numbers as the metrics of the features that inference wrote.
    query, gallery = load_features_npz(inference_npz)
    want = compute_metrics(squared_euclidean(query.feats, gallery.feats), query.pids, gallery.pids,
                           query.camids, gallery.camids, max_rank=10)
    assert metrics["mAP"] == pytest.approx(want["mAP"], abs=1e-4)
    assert metrics["cmc_rank_1"] == pytest.approx(want["cmc"][0], abs=1e-4)
    assert metrics["re_ranking"] is False and metrics["k1"] is None
    assert len(metrics["cmc"]) == 10 and metrics["cmc_rank_10"] == metrics["cmc"][9]
    assert all(0 <= metrics[k] <= 1 for k in ("mAP", "mINP", "cmc_rank_1", "cmc_rank_5", "cmc_rank_10"))
    for png in ("cmc_curve.png", "sampled_matches.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "status.json").read_text().splitlines()[-1])["event"] == "done"


def perfect_features(tmp_path: Path) -> Path:
    """Features where each identity has its own direction: every query's true matches rank first."""
    rng = np.random.default_rng(0)
    centres = np.eye(16, dtype=np.float32)

    def make(pids, camids, name):
        feats = centres[pids] + 0.01 * rng.normal(size=(len(pids), 16)).astype(np.float32)
        return LabelledFeatures(feats, np.array(pids), np.array(camids),
                                [str(tmp_path / f"{name}{i}.jpg") for i in range(len(pids))])

    query = make([1, 2, 3, 4], [0, 1, 0, 1], "q")
    # pid 4 is only on the query's own camera: that query is skipped; -1 junk and 0 distractors mixed in.
    gallery = make([1, 1, 2, 3, 3, 4, 0, 0, -1, 5], [1, 2, 0, 1, 2, 1, 0, 1, 2, 0], "g")
    path = tmp_path / "perfect.npz"
    save_features_npz(path, query, gallery)
    return path


def test_evaluate_features_file_without_a_model(cli, tmp_path):
    out = tmp_path / "evaluate"  # <results_dir>/evaluate
    cmc_png = tmp_path / "plots" / "cmc.png"
    result = cli("evaluate", "--features", perfect_features(tmp_path), f"results_dir={tmp_path}",
                 "re_ranking.re_ranking=false", f"evaluate.output_cmc_curve_plot={cmc_png}")
    assert result.code == 0, result.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == 1.0 and metrics["mINP"] == 1.0 and metrics["cmc_rank_1"] == 1.0
    assert metrics["num_valid_queries"] == 3 and metrics["num_skipped_queries"] == 1
    assert metrics["num_gallery"] == 9  # junk dropped
    assert cmc_png.read_bytes().startswith(PNG_MAGIC)
    assert (out / "sampled_matches.png").read_bytes().startswith(PNG_MAGIC)


def test_bad_features_file_is_one_line_exit_2(cli, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, query_feats=np.zeros((2, 4), np.float32))
    result = cli("evaluate", "--features", path, f"results_dir={tmp_path}")
    assert result.code == 2
    assert result.err.strip().startswith("error: features file") and "lacks key(s)" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_mismatched_features_file_is_one_line_exit_2(cli, tmp_path):
    rng = np.random.default_rng(0)
    query = LabelledFeatures(rng.normal(size=(2, 4)).astype(np.float32), np.array([1, 2]), np.array([0, 0]),
                             ["a", "b"])
    gallery = LabelledFeatures(rng.normal(size=(3, 5)).astype(np.float32), np.array([1, 2, 3]),
                               np.array([1, 1, 1]), ["c", "d", "e"])
    path = tmp_path / "mismatch.npz"
    save_features_npz(path, query, gallery)
    result = cli("evaluate", "--features", path, f"results_dir={tmp_path}")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "query_feats has 4 columns but gallery_feats has 5" in result.err


def test_model_file_that_does_not_load_is_one_line_exit_2(cli, tiny_overrides, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    for command, key in (("evaluate", "evaluate.checkpoint"), ("inference", "inference.checkpoint")):
        result = cli(command, "-e", SPEC, *tiny_overrides, f"{key}={broken}")
        assert result.code == 2, result.err
        assert result.err.startswith("error: ") and "broken.pth" in result.err
        assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_query_folder_without_valid_images_is_one_line_exit_2(cli, tiny_overrides, tiny_checkpoint, tmp_path):
    query = tmp_path / "query"
    query.mkdir()
    (query / "0001_c1s1_000001_00.jpg").write_text("not an image")
    (query / "0002_c2s1_000001_00.jpg").write_bytes(b"")
    result = cli("-q", "evaluate", "-e", SPEC, *tiny_overrides, f"evaluate.checkpoint={tiny_checkpoint}",
                 f"evaluate.query_dataset={query}")
    assert result.code == 2
    assert result.err.strip().splitlines()[-1].startswith("error: none of the 2 query images could be read")
    result = cli("-q", "inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 f"inference.query_dataset={query}", "dataset.on_bad_image=error")
    assert result.code == 2 and "0001_c1s1_000001_00.jpg" in result.err
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 f"inference.query_dataset={empty}")
    assert result.code == 2 and result.err.startswith("error: no images in")


def test_evaluate_needs_a_model_or_features(cli, tmp_path):
    result = cli("evaluate", f"results_dir={tmp_path}")
    assert result.code == 2 and "evaluate.checkpoint" in result.err


def test_inference_rejects_other_output_formats(cli, tiny_overrides, tiny_checkpoint, tmp_path):
    result = cli("inference", "-e", SPEC, *tiny_overrides, f"inference.checkpoint={tiny_checkpoint}",
                 f"inference.output_file={tmp_path / 'features.csv'}")
    assert result.code == 2 and "inference.output_file" in result.err


def test_evaluate_with_re_ranking_shows_both_rows(cli, tmp_path, monkeypatch):
    """The wiring: re-ranked distances feed the final metrics and plots; plain metrics are kept beside."""
    import sys
    import types

    calls = []

    def fake_rerank_rows(query_feats, gallery_feats, k1, k2, lambda_value):
        calls.append((query_feats.shape, gallery_feats.shape, k1, k2, lambda_value))
        for start in range(0, len(query_feats), 3):  # in chunks of 3 queries
            rows = slice(start, min(start + 3, len(query_feats)))
            plain = squared_euclidean(query_feats[rows], gallery_feats)
            yield rows, -plain, plain  # reversed ranking: visibly different

    monkeypatch.setitem(sys.modules, "reid_deploy.retrieval.rerank",
                        types.SimpleNamespace(rerank_rows=fake_rerank_rows))
    result = cli("evaluate", "--features", perfect_features(tmp_path), f"results_dir={tmp_path}",
                 "re_ranking.k1=5", "re_ranking.k2=2", "re_ranking.lambda_value=0.25")
    assert result.code == 0, result.err
    assert calls == [((4, 16), (9, 16), 5, 2, 0.25)]  # junk dropped before re-ranking
    rows = [line for line in result.out.splitlines() if "%" in line]
    assert [row.split()[1] for row in rows] == ["plain", "re-ranked"]
    assert "100.00%" in rows[0] and "re-ranking: k1=5, k2=2, λ=0.25" in result.out
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["re_ranking"] is True
    assert (metrics["k1"], metrics["k2"], metrics["lambda_value"]) == (5, 2, 0.25)
    assert metrics["without_re_ranking"]["mAP"] == 1.0 and metrics["mAP"] < 1.0


def test_evaluate_with_the_real_re_ranking(cli, tmp_path):
    rerank = pytest.importorskip("reid_deploy.retrieval.rerank")
    path = perfect_features(tmp_path)
    result = cli("evaluate", "--features", path, f"results_dir={tmp_path}", "re_ranking.k1=4",
                 "re_ranking.k2=2", "re_ranking.lambda_value=0.3")
    assert result.code == 0, result.err
    query, gallery = load_features_npz(path)
    keep = gallery.pids != -1
    gallery = gallery.select(keep)
    distmat = rerank.rerank_distances(query.feats / np.linalg.norm(query.feats, axis=1, keepdims=True),
                                      gallery.feats / np.linalg.norm(gallery.feats, axis=1, keepdims=True),
                                      4, 2, 0.3)
    want = compute_metrics(distmat, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=10)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert metrics["cmc"] == pytest.approx(want["cmc"], abs=1e-6)


def six_array_features(path: Path) -> Path:
    """``perfect_features`` without query_paths / gallery_paths, as another tool writes them."""
    with np.load(perfect_features(path.parent)) as data:
        np.savez(path, **{k: data[k] for k in data.files if not k.endswith("_paths")})
    return path


def test_evaluate_features_file_without_paths_draws_placeholders(cli, tmp_path):
    path = six_array_features(tmp_path / "six.npz")
    result = cli("evaluate", "--features", path, f"results_dir={tmp_path}", "re_ranking.k1=4", "re_ranking.k2=2")
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["without_re_ranking"]["mAP"] == 1.0 and metrics["num_gallery"] == 9
    notes = [line for line in result.err.splitlines() if "image paths" in line]
    assert len(notes) == 1 and "has no query or gallery image paths" in notes[0] and str(path) in notes[0]
    assert (tmp_path / "evaluate" / "sampled_matches.png").read_bytes().startswith(PNG_MAGIC)


def test_log_lines_into_a_pipe_are_never_wrapped(tmp_path):
    """The real ``reid`` script with stderr captured: a record with a long path stays on one line."""
    import subprocess
    import sys

    folder = tmp_path / ("a_rather_long_folder_name_for_features_written_by_another_tool_" * 2)
    folder.mkdir()
    path = six_array_features(folder / "0990_c1s1_900001_00_features.npz")
    done = subprocess.run([sys.executable, "-m", "reid_deploy.cli", "evaluate", "--features", str(path),
                           f"results_dir={tmp_path}", "re_ranking.re_ranking=false"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "image paths" in line]
    assert len(notes) == 1 and len(notes[0]) > 200, done.stderr
    assert notes[0].endswith(f"WARNING {path} has no query or gallery image paths: the match plot shows "
                             f"placeholders")
    assert all(len(line) < 500 for line in done.stderr.splitlines())  # one line per record, no padding
