"""``reid search``: the results JSON, re-ranked search, single-image queries and the montage."""

from __future__ import annotations

import json
from pathlib import Path

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
    status = (Path(opts[0].split("=", 1)[1]) / "search" / "status.json").read_text()
    assert '"searched"' in status


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
