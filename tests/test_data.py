import hashlib
from pathlib import Path

import pytest
from PIL import Image

from reid_deploy.data.market1501 import parse_name, read_eval, read_split, read_train, summarize
from reid_deploy.data.synthetic import generate_demo_data
from reid_deploy.errors import DataError


@pytest.mark.parametrize("name, expected", [
    ("0002_c1s1_000451_03.jpg", (2, 0)),
    ("1501_c6s4_001877_01.jpg", (1501, 5)),
    ("0000_c3s2_000123_02.jpg", (0, 2)),       # distractor
    ("-1_c1s1_000401_03.jpg", (-1, 0)),        # junk
    ("0007_c2_000001.png", (7, 1)),            # no sequence part
])
def test_parse_market_names(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize("name", ["Thumbs.db", "person.jpg", "0002_x1s1_000451_03.jpg", "0002_c0s1_0001_01.jpg",
                                  "abc_c1s1_000001_01.jpg"])
def test_unparseable_names(name):
    assert parse_name(name) is None


def _write(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 16), (120, 30, 30)).save(folder / name)


def test_read_split_drops_junk_keeps_distractors_and_ignores_stray_files(tmp_path):
    _write(tmp_path, ["0001_c1s1_000001_01.jpg", "0000_c2s1_000002_01.jpg", "-1_c1s1_000003_01.jpg"])
    (tmp_path / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 10)
    records = read_split(tmp_path)
    assert sorted((r.pid, r.camid) for r in records) == [(0, 1), (1, 0)]
    assert len(read_split(tmp_path, keep_junk=True)) == 3


def test_train_relabels_and_checks_num_classes(tmp_path):
    _write(tmp_path, ["0007_c1s1_000001_01.jpg", "0007_c2s1_000002_01.jpg", "0042_c1s1_000003_01.jpg"])
    records = read_train(tmp_path, num_classes=2)
    assert sorted({r.pid for r in records}) == [0, 1]
    with pytest.raises(DataError, match="num_classes = 5 .* 2 identities"):
        read_train(tmp_path, num_classes=5)


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        read_split(tmp_path)
    _write(tmp_path, ["0001_c1s1_000001_01.jpg", "holiday.jpg", "IMG_0001.jpg"])
    with pytest.raises(DataError, match="2 image name.*holiday.jpg"):
        read_split(tmp_path)
    with pytest.raises(DataError, match="query"):
        read_eval(None, tmp_path)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.jpg")):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_demo_data_layout_and_determinism(tmp_path):
    a = generate_demo_data(tmp_path / "a", ids=6, cams=3, seed=5, distractors=3, junk=2)
    generate_demo_data(tmp_path / "b", ids=6, cams=3, seed=5, distractors=3, junk=2)
    generate_demo_data(tmp_path / "c", ids=6, cams=3, seed=6, distractors=3, junk=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    root = tmp_path / "a"
    assert {p.name for p in root.iterdir()} == {"bounding_box_train", "bounding_box_test", "query"}
    train = read_train(root / "bounding_box_train", num_classes=6)
    query, gallery = read_eval(root / "query", root / "bounding_box_test")
    assert summarize(train).identities == 6 and summarize(query).identities == 6
    gallery_pids = {r.pid for r in gallery}
    assert 0 in gallery_pids                                    # distractors
    assert len(read_split(root / "bounding_box_test", keep_junk=True)) == len(gallery) + 2  # junk on disk
    train_pids = {int(Path(p).name[:4]) for p in map(str, (root / "bounding_box_train").glob("*.jpg"))}
    assert train_pids.isdisjoint({r.pid for r in query})       # train and test identities disjoint
    for q in query:                                             # every query has a cross-camera match
        assert any(g.pid == q.pid and g.camid != q.camid for g in gallery)
    sizes = {Image.open(r.path).size for r in a.train[:5]}
    assert sizes == {(64, 128)}


def test_demo_data_refuses_a_folder_with_images(tmp_path):
    generate_demo_data(tmp_path, ids=3, cams=2, distractors=0, junk=0)
    with pytest.raises(DataError, match="not empty"):
        generate_demo_data(tmp_path, ids=3, cams=2)
