"""Synthetic Market-1501-layout demo data: drawn people, deterministic for a seed.

Identity decides clothing colours, patterns, bag, hair and build; the camera decides lighting, colour
cast, background and blur; each image gets its own pose, scale, crop jitter and flip. Train and test
identities are disjoint; the gallery also holds distractors (pid 0000) and junk (pid -1).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid_deploy.data.market1501 import ImageRecord
from reid_deploy.errors import DataError

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "band", "logo")


@dataclass(frozen=True)
class Identity:
    shirt: tuple[int, int, int]
    shirt2: tuple[int, int, int]
    pattern: str
    pants: tuple[int, int, int]
    shoes: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    bag: tuple[int, int, int] | None
    long_sleeves: bool
    shorts: bool
    build: float
    height: float


@dataclass(frozen=True)
class Camera:
    gain: tuple[float, float, float]
    brightness: float
    background: tuple[int, int, int]
    floor: tuple[int, int, int]
    blur: float
    noise: float


def _color(rng: np.random.Generator, sat: tuple[float, float] = (0.35, 1.0),
           val: tuple[float, float] = (0.2, 0.95)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return int(r * 255), int(g * 255), int(b * 255)


def make_identity(rng: np.random.Generator) -> Identity:
    tone = rng.uniform(0.25, 0.95)
    skin = (int(255 * tone), int(200 * tone), int(160 * tone))
    return Identity(
        shirt=_color(rng), shirt2=_color(rng), pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pants=_color(rng, sat=(0.0, 0.7), val=(0.1, 0.8)), shoes=_color(rng, sat=(0.0, 0.5), val=(0.05, 0.6)),
        skin=skin, hair=_color(rng, sat=(0.1, 0.6), val=(0.05, 0.6)),
        bag=_color(rng) if rng.random() < 0.5 else None, long_sleeves=bool(rng.random() < 0.5),
        shorts=bool(rng.random() < 0.3), build=float(rng.uniform(0.8, 1.25)), height=float(rng.uniform(0.85, 1.0)))


def make_camera(rng: np.random.Generator) -> Camera:
    # Per-channel colour cast of +-15 %: enough to shift clothing hues between cameras (a raw-pixel
    # baseline stays near mAP 0.05), mild enough that colour still tells identities apart.
    return Camera(gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)),
                  brightness=float(rng.uniform(0.75, 1.2)),
                  background=_color(rng, sat=(0.0, 0.35), val=(0.3, 0.85)),
                  floor=_color(rng, sat=(0.0, 0.3), val=(0.2, 0.7)),
                  blur=float(rng.uniform(0.0, 1.2)), noise=float(rng.uniform(2.0, 9.0)))


def draw_person(person: Identity, camera: Camera, rng: np.random.Generator,
                width: int = 64, height: int = 128) -> Image.Image:
    """One image of ``person`` as ``camera`` sees it, with random pose, scale, crop and flip."""
    s = 2  # draw at twice the size, then downsample (anti-aliasing)
    w, h = width * s, height * s
    img = Image.new("RGB", (w, h), camera.background)
    draw = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.55, 0.75))
    draw.rectangle([0, horizon, w, h], fill=camera.floor)
    for _ in range(3):  # background clutter
        x0, y0 = rng.integers(0, w), rng.integers(0, horizon)
        shade = tuple(int(np.clip(c + rng.integers(-40, 40), 0, 255)) for c in camera.background)
        draw.rectangle([x0, y0, x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 3)], fill=shade)

    scale = person.height * rng.uniform(0.85, 1.05)
    tall = h * 0.92 * scale
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    top = h * 0.04 + rng.uniform(0, 0.04) * h
    unit = tall / 8.0  # body proportions in heads
    half = unit * 0.75 * person.build
    neck, waist, knee, foot = top + unit * 1.1, top + unit * 4.0, top + unit * 6.0, top + tall

    stride = rng.uniform(-0.6, 0.6) * unit
    for side in (-1, 1):  # legs
        hip_x = cx + side * half * 0.45
        foot_x = hip_x + side * abs(stride) * 0.6 + stride * 0.3
        draw.polygon([(hip_x - half * 0.42, waist), (hip_x + half * 0.42, waist),
                      (foot_x + half * 0.3, foot - unit * 0.25), (foot_x - half * 0.3, foot - unit * 0.25)],
                     fill=person.pants)
        if person.shorts:
            draw.polygon([((hip_x + foot_x) / 2 - half * 0.3, knee), ((hip_x + foot_x) / 2 + half * 0.3, knee),
                          (foot_x + half * 0.28, foot - unit * 0.25), (foot_x - half * 0.28, foot - unit * 0.25)],
                         fill=person.skin)
        draw.ellipse([foot_x - half * 0.45, foot - unit * 0.4, foot_x + half * 0.45, foot], fill=person.shoes)

    if person.bag is not None:  # backpack, seen from the side that faces the camera
        draw.rectangle([cx + half * 0.7, neck + unit * 0.3, cx + half * 1.35, waist - unit * 0.3], fill=person.bag)

    torso = [cx - half, neck, cx + half, waist]
    draw.rectangle(torso, fill=person.shirt)
    _pattern(draw, person, torso, unit)

    swing = rng.uniform(-0.5, 0.5) * unit
    for side in (-1, 1):  # arms
        sx, hand_x = cx + side * half, cx + side * (half + unit * 0.35) + swing * side
        hand_y = waist + unit * 0.2
        draw.line([(sx, neck + unit * 0.2), (hand_x, hand_y)], fill=person.shirt, width=int(unit * 0.5))
        if not person.long_sleeves:
            mid = ((sx + hand_x) / 2, (neck + hand_y) / 2)
            draw.line([mid, (hand_x, hand_y)], fill=person.skin, width=int(unit * 0.4))

    head_r = unit * 0.5
    draw.ellipse([cx - head_r, top, cx + head_r, top + unit * 1.1], fill=person.skin)
    draw.chord([cx - head_r, top - unit * 0.05, cx + head_r, top + unit * 0.8], 180, 360, fill=person.hair)

    img = img.resize((width, height), Image.BILINEAR)
    img = _crop_jitter(img, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _camera_effects(img, camera, rng)


def _pattern(draw: ImageDraw.ImageDraw, person: Identity, box: list[float], unit: float) -> None:
    x0, y0, x1, y1 = box
    step = max(unit * 0.45, 3)
    if person.pattern == "hstripes":
        for y in np.arange(y0, y1, 2 * step):
            draw.rectangle([x0, y, x1, min(y + step, y1)], fill=person.shirt2)
    elif person.pattern == "vstripes":
        for x in np.arange(x0, x1, 2 * step):
            draw.rectangle([x, y0, min(x + step, x1), y1], fill=person.shirt2)
    elif person.pattern == "checks":
        for i, y in enumerate(np.arange(y0, y1, step)):
            for j, x in enumerate(np.arange(x0, x1, step)):
                if (i + j) % 2:
                    draw.rectangle([x, y, min(x + step, x1), min(y + step, y1)], fill=person.shirt2)
    elif person.pattern == "band":
        mid = (y0 + y1) / 2
        draw.rectangle([x0, mid - step, x1, mid + step], fill=person.shirt2)
    elif person.pattern == "logo":
        cx, cy = (x0 + x1) / 2, y0 + (y1 - y0) * 0.35
        draw.ellipse([cx - step * 1.2, cy - step * 1.2, cx + step * 1.2, cy + step * 1.2], fill=person.shirt2)


def _crop_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    zoom = rng.uniform(0.85, 1.0)
    cw, ch = w * zoom, h * zoom
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    return img.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _camera_effects(img: Image.Image, camera: Camera, rng: np.random.Generator) -> Image.Image:
    if camera.blur > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(camera.blur))
    arr = np.asarray(img, dtype=np.float32)
    light = camera.brightness * rng.uniform(0.9, 1.1)
    arr = arr * np.asarray(camera.gain, dtype=np.float32) * light
    arr += rng.normal(0, camera.noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@dataclass
class DemoLayout:
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]


def generate_demo_data(out: str | Path, ids: int = 60, cams: int = 4, seed: int = 0,
                       images_per_camera: int = 5, distractors: int = 40, junk: int = 20,
                       width: int = 64, height: int = 128) -> DemoLayout:
    """Write ``bounding_box_train/``, ``bounding_box_test/`` and ``query/`` under ``out``.

    ``ids`` identities for training and ``ids`` others for testing; each identity appears in 2..cams
    cameras with 1..images_per_camera images per camera. One image per (test identity, camera) goes to
    the query set, the rest to the gallery.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    cameras = [make_camera(rng) for _ in range(cams)]
    people = {pid: make_identity(rng) for pid in range(1, 2 * ids + 1)}
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; demo data goes into a new or empty folder")
    dirs = {name: out / name for name in ("bounding_box_train", "bounding_box_test", "query")}
    for d in dirs.values():
        if d.is_dir() and any(d.iterdir()):
            raise DataError(f"{d} is not empty; demo data goes into a new or empty folder")
        d.mkdir(parents=True, exist_ok=True)
    layout = DemoLayout([], [], [])
    frame = 0

    def save(pid: int, cam: int, person: Identity, split: str) -> ImageRecord:
        nonlocal frame
        frame += 1
        path = dirs[split] / f"{pid:04d}_c{cam + 1}s1_{frame:06d}_01.jpg" if pid >= 0 else \
            dirs[split] / f"-1_c{cam + 1}s1_{frame:06d}_01.jpg"
        draw_person(person, cameras[cam], rng, width, height).save(path, quality=92)
        return ImageRecord(str(path), pid, cam)

    for pid, person in people.items():
        is_train = pid <= ids
        seen = rng.choice(cams, size=int(rng.integers(2, cams + 1)), replace=False)
        for cam in sorted(int(c) for c in seen):
            count = int(rng.integers(1, images_per_camera + 1)) + (0 if is_train else 1)
            for i in range(count):
                if is_train:
                    layout.train.append(save(pid, cam, person, "bounding_box_train"))
                elif i == 0:
                    layout.query.append(save(pid, cam, person, "query"))
                else:
                    layout.gallery.append(save(pid, cam, person, "bounding_box_test"))
    for _ in range(distractors):
        layout.gallery.append(save(0, int(rng.integers(cams)), make_identity(rng), "bounding_box_test"))
    for _ in range(junk):
        layout.gallery.append(save(-1, int(rng.integers(cams)), make_identity(rng), "bounding_box_test"))
    return layout
