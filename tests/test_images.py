"""Odd image files: readable ones become RGB model inputs, unreadable ones raise one clear DataError."""

import numpy as np
import pytest
from PIL import Image

from reid_deploy.errors import DataError
from reid_deploy.inference.preprocess import Preprocess, open_image

PRE = Preprocess(32, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("make", [
    lambda p: _save(p / "gray.jpg", Image.new("L", (20, 40), 90)),
    lambda p: _save(p / "cmyk.jpg", Image.new("CMYK", (20, 40), (0, 50, 100, 0))),
    lambda p: _save(p / "rgba.png", Image.new("RGBA", (20, 40), (10, 200, 30, 128))),
    lambda p: _save(p / "palette.png", Image.new("P", (20, 40), 3)),
    lambda p: _save(p / "sixteen.png", Image.fromarray(np.arange(800, dtype=np.uint16).reshape(40, 20) * 80)),
    lambda p: _save(p / "tiny.jpg", Image.new("RGB", (5, 9), (1, 2, 3))),
    lambda p: _save(p / "huge.jpg", Image.new("RGB", (6000, 4000), (200, 10, 10)), quality=50),
], ids=["grayscale", "cmyk", "rgba", "palette", "16-bit", "5x9", "huge"])
def test_readable_odd_images_become_rgb_inputs(tmp_path, make):
    path = make(tmp_path)
    assert open_image(path).mode == "RGB"
    x = PRE.load(path)
    assert x.shape == (3, 32, 16) and x.dtype == np.float32 and np.isfinite(x).all()
    uint8 = PRE.load_uint8(path)
    assert uint8.shape == (3, 32, 16) and uint8.dtype == np.uint8
    with Image.open(path) as opened:  # the same image handed over in memory (the crops API)
        np.testing.assert_array_equal(PRE.crop_to_uint8(opened), uint8)


def _truncated(p):
    Image.new("RGB", (64, 128), (9, 99, 199)).save(p / "full.jpg")
    data = (p / "full.jpg").read_bytes()
    (p / "cut.jpg").write_bytes(data[: len(data) // 2])
    return p / "cut.jpg"


@pytest.mark.parametrize("make", [
    lambda p: (p / "empty.jpg").write_bytes(b"") and None or p / "empty.jpg",
    lambda p: (p / "text.jpg").write_text("not an image") and None or p / "text.jpg",
    _truncated,
], ids=["zero-byte", "text", "truncated"])
def test_unreadable_images_raise_one_line(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        open_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_rgba_background_is_white_not_black(tmp_path):
    path = _save(tmp_path / "clear.png", Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_training_images_are_dropped_up_front(tmp_path, caplog):
    from reid_deploy.data.dataset import readable_records
    from reid_deploy.data.market1501 import ImageRecord

    good = _save(tmp_path / "0001_c1s1_000001_01.jpg", Image.new("RGB", (8, 16)))
    (tmp_path / "0001_c2s1_000002_01.jpg").write_text("text")
    records = [ImageRecord(str(good), 0, 0), ImageRecord(str(tmp_path / "0001_c2s1_000002_01.jpg"), 0, 1)]
    with caplog.at_level("WARNING", logger="reid"):
        assert readable_records(records) == records[:1]
    assert "0001_c2s1_000002_01.jpg" in caplog.text and "skipped 1 unreadable" in caplog.text
    with pytest.raises(DataError, match="0001_c2s1_000002_01.jpg"):
        readable_records(records, on_bad_image="error")
