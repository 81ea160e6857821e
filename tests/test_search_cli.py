"""``reid search``: the results JSON, re-ranked search, single-image queries and the montage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.retrieval.index import GalleryIndex


@pytest.fixture(scope="module")
def built(tiny_checkpoint, demo_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    from reid_deploy.cli import main

    tmp = tmp_path_factory.mktemp("search")
    out = tmp / "gallery.index"
    assert main(["-q", "index", "build", "--model", str(tiny_checkpoint), "--images",
                 str(demo_dir / "bounding_box_test"), "--out", str(out), f"results_dir={tmp / 'results'}",
                 "dataset.num_workers=0"]) == 0
    return out, [f"results_dir={tmp / 'results'}", "dataset.num_workers=0"]


@pytest.mark.parametrize("rerank", [False, True])
def test_search_writes_ranked_matches(cli, built, tiny_checkpoint, demo_dir, tmp_path, rerank):
    index, opts = built
    out = tmp_path / "results.json"
    result = cli("search", "--index", index, "--model", tiny_checkpoint, "--query", demo_dir / "query",
                 "--top-k", 5, "--out", out, *(["--rerank"] if rerank else []), *opts)
    assert result.code == 0, result.err
    assert "queries/s" in result.out
    data = json.loads(out.read_text())
    queries = sorted(str(p.resolve()) for p in (demo_dir / "query").iterdir())
    assert [r["query"] for r in data["results"]] == queries
    gallery = set(GalleryIndex.load(index).paths)
    for entry in data["results"]:
        matches = entry["matches"]
        assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
        distances = [m["distance"] for m in matches]
        assert distances == sorted(distances) and all(d >= 0 for d in distances)
        assert all(m["path"] in gallery and {"pid", "camid"} <= m.keys() for m in matches)
        assert len({m["path"] for m in matches}) == 5
    assert data["rerank"] is rerank
    status = (Path(opts[0].split("=", 1)[1]) / "search" / "status.json").read_text().splitlines()
    searched = json.loads(status[-1])
    assert searched["event"] == "searched" and searched["rerank"] is rerank
    if rerank:  # where the time went: the gallery pass, then the CPU set algebra
        assert set(searched["rerank_phases_seconds"]) == {"gallery_pass", "weights", "pairs", "select"}
        assert "gallery pass" in result.err
    else:
        assert "rerank_phases_seconds" not in searched


def test_search_single_image_finds_itself_and_draws_montage(cli, built, tiny_checkpoint, demo_dir, tmp_path):
    index, opts = built
    image = sorted((demo_dir / "bounding_box_test").iterdir())[3]
    out, montage = tmp_path / "one.json", tmp_path / "montage.png"
    result = cli("search", "--index", index, "--model", tiny_checkpoint, "--query", image, "--top-k", 3,
                 "--out", out, "--montage", montage, *opts)
    assert result.code == 0, result.err
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["matches"][0]["path"] == str(image.resolve()) and entry["matches"][0]["distance"] < 1e-4
    assert montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_bad_query_is_one_line(cli, built, tiny_checkpoint, tmp_path):
    index, opts = built
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("search", "--index", index, "--model", tiny_checkpoint, "--query", empty, "--out",
                 tmp_path / "r.json", *opts)
    assert result.code == 2 and "no images" in result.err


def test_montage_of_a_gallery_smaller_than_top_k(cli, tiny_checkpoint, demo_dir, tmp_path):
    gallery = tmp_path / "small"
    gallery.mkdir()
    for image in sorted((demo_dir / "bounding_box_test").iterdir())[:3]:
        (gallery / image.name).write_bytes(image.read_bytes())
    opts = [f"results_dir={tmp_path / 'results'}", "dataset.num_workers=0"]
    index, out, montage = tmp_path / "small.index", tmp_path / "r.json", tmp_path / "m.png"
    assert cli("index", "build", "--model", tiny_checkpoint, "--images", gallery, "--out", index, *opts).code == 0
    result = cli("search", "--index", index, "--model", tiny_checkpoint, "--query", demo_dir / "query",
                 "--top-k", 10, "--out", out, "--montage", montage, *opts)
    assert result.code == 0, result.err
    assert all(len(r["matches"]) == 3 for r in json.loads(out.read_text())["results"])
    assert montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_of_only_unreadable_images_is_refused(cli, tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("0001_c1s1_000001_00.jpg", "0002_c2s1_000001_00.jpg"):
        (broken / name).write_bytes(b"not a jpeg")
    out = tmp_path / "none.index"
    result = cli("index", "build", "--model", tiny_checkpoint, "--images", broken, "--out", out,
                 f"results_dir={tmp_path / 'results'}", "dataset.num_workers=0", "index.index_type=ivf")
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]  # after one warning per skipped image
    assert last.startswith("error:") and "could be read" in last and "Traceback" not in result.err
    assert not out.exists()


def unit_rows(n: int, d: int, seed: int, ids: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ids, d))[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_features_in_results_out(cli, tmp_path):
    """index build/add --features and search --query-features (plain and re-ranked) without any image."""
    from reid_deploy.retrieval.rerank import rerank_topk

    gallery, queries = unit_rows(180, 24, 0), unit_rows(9, 24, 1)
    names = [f"/cam/{i:04d}_c1s1_000001_01.jpg" for i in range(180)]
    np.savez(tmp_path / "a.npz", gallery_feats=gallery[:120], gallery_paths=np.array(names[:120]))
    np.savez(tmp_path / "b.npz", gallery_feats=gallery[100:], gallery_paths=np.array(names[100:]))  # 20 known
    np.savez(tmp_path / "q.npz", query_feats=queries, query_paths=np.array([f"/q/{i}.jpg" for i in range(9)]))
    opts = [f"results_dir={tmp_path / 'results'}", "re_ranking.k1=9", "re_ranking.k2=4"]
    index = tmp_path / "g.index"
    assert cli("index", "build", "--features", tmp_path / "a.npz", "--out", index, *opts).code == 0
    result = cli("index", "add", "--index", index, "--features", tmp_path / "b.npz", *opts)
    assert result.code == 0 and result.out.startswith("added 60 images"), result.err
    assert GalleryIndex.load(index).fingerprint == {}
    for rerank, expected in ((True, rerank_topk(queries, gallery, 7, 9, 4, 0.3)),
                             (False, np.argsort(((queries[:, None] - gallery[None]) ** 2).sum(-1), axis=1)[:, :7])):
        result = cli("search", "--index", index, "--query-features", tmp_path / "q.npz", "--top-k", 7, "--out",
                     tmp_path / "r.json", *(["--rerank"] if rerank else []), *opts)
        assert result.code == 0, result.err
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["rerank"] is rerank and [r["query"] for r in data["results"]] == [f"/q/{i}.jpg" for i in range(9)]
        got = [[names.index(m["path"]) for m in r["matches"]] for r in data["results"]]
        assert all({"rank", "path", "distance", "pid", "camid"} <= m.keys()
                   for r in data["results"] for m in r["matches"])
        np.testing.assert_array_equal(got, expected[0] if rerank else expected)
        if rerank:
            np.testing.assert_allclose([[m["distance"] for m in r["matches"]] for r in data["results"]], expected[1],
                                       atol=1e-5)


def test_bad_features_are_one_line(cli, tmp_path):
    good = unit_rows(20, 8, 2)
    paths = np.array([f"{i}.jpg" for i in range(20)])
    np.savez(tmp_path / "g.npz", gallery_feats=good, gallery_paths=paths)
    opts = [f"results_dir={tmp_path / 'results'}"]
    index = tmp_path / "g.index"
    assert cli("index", "build", "--features", tmp_path / "g.npz", "--out", index, *opts).code == 0
    nan = good.copy()
    nan[3, 1] = np.nan
    cases = {"long": (dict(query_feats=good * 1.5, query_paths=paths), "not 1"),
             "dim": (dict(query_feats=unit_rows(20, 6, 3), query_paths=paths), "feat_dim 8"),
             "nan": (dict(query_feats=nan, query_paths=paths), "NaN"),
             "key": (dict(query_feats=good), "lacks key(s) query_paths"),
             "repeat": (dict(query_feats=good, query_paths=np.array(["x.jpg"] * 20)), "repeats x.jpg")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        cli("search", "--index", index, "--query-features", tmp_path / f"{name}.npz", "--out", tmp_path / "r.json",
            *opts).user_error(message)
    np.savez(tmp_path / "bad_gallery.npz", gallery_feats=good * 2, gallery_paths=paths)
    for command in (("index", "build", "--out", tmp_path / "x.index"), ("index", "add", "--index", index)):
        cli(*command, "--features", tmp_path / "bad_gallery.npz", *opts).user_error("L2-normalised")
    cli("search", "--index", index, "--query-features", tmp_path / "missing.npz", "--out", tmp_path / "r.json",
        *opts).user_error("not found")
    cli("index", "build", "--out", tmp_path / "x.index", *opts).user_error("--model and --images")
    cli("search", "--index", index, "--query-features", tmp_path / "g.npz", "--query", tmp_path, "--out",
        tmp_path / "r.json", *opts).user_error("either a features file")


def test_index_from_features_searched_with_a_model_warns_once(cli, tiny_checkpoint, demo_dir, tmp_path):
    images = sorted(str(p.resolve()) for p in (demo_dir / "bounding_box_test").iterdir())
    np.savez(tmp_path / "g.npz", gallery_feats=unit_rows(len(images), 32, 4), gallery_paths=np.array(images))
    opts = [f"results_dir={tmp_path / 'results'}", "dataset.num_workers=0"]
    index = tmp_path / "g.index"
    assert cli("index", "build", "--features", tmp_path / "g.npz", "--out", index, *opts).code == 0
    for rerank in ([], ["--rerank"]):
        result = cli("search", "--index", index, "--model", tiny_checkpoint, "--query", demo_dir / "query", "--out",
                     tmp_path / "r.json", *rerank, *opts)
        assert result.code == 0, result.err
        assert result.err.count("cannot be checked") == 1
    result = cli("index", "add", "--index", index, "--model", tiny_checkpoint, "--images", demo_dir / "query", *opts)
    assert result.code == 0 and result.err.count("cannot be checked") == 1, result.err
