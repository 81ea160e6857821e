"""Market-1501 layout: file-name parsing and the train / query / gallery splits.

Names look like ``0002_c1s1_000451_03.jpg``: 4-digit person id (``0000`` distractor, ``-1`` junk),
camera ``c1``, sequence ``s1``, frame, box. Cameras are returned 0-based (``c1`` -> 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from reid_deploy.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
NAME_PATTERN = re.compile(r"^(-1|\d{1,5})_c(\d+)(?:s(\d+))?_")
JUNK_PID = -1
DISTRACTOR_PID = 0


@dataclass(frozen=True)
class ImageRecord:
    path: str
    pid: int
    camid: int


def parse_name(name: str) -> tuple[int, int] | None:
    """(pid, 0-based camid) from a Market-1501 file name, or None when the name does not parse."""
    match = NAME_PATTERN.match(name)
    if match is None or int(match.group(2)) < 1:
        return None
    return int(match.group(1)), int(match.group(2)) - 1


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files and non-images are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} is a file, not a folder" if folder.exists()
                        else f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def read_split(folder: str | Path, relabel: bool = False, keep_junk: bool = False) -> list[ImageRecord]:
    """Parse every image name in ``folder``; junk (pid -1) is dropped unless ``keep_junk``.

    With ``relabel`` the pids become 0..n-1 in sorted order (training labels).
    """
    paths = list_images(folder)
    if not paths:
        raise DataError(f"no images in {folder} (expected Market-1501 names like 0002_c1s1_000451_03.jpg)")
    records, unparsed = [], []
    for path in paths:
        parsed = parse_name(path.name)
        if parsed is None:
            unparsed.append(path.name)
            continue
        pid, camid = parsed
        if pid == JUNK_PID and not keep_junk:
            continue
        records.append(ImageRecord(str(path), pid, camid))
    if unparsed:
        shown = ", ".join(unparsed[:5]) + (f" and {len(unparsed) - 5} more" if len(unparsed) > 5 else "")
        raise DataError(f"{len(unparsed)} image name(s) in {folder} do not follow the Market-1501 pattern "
                        f"PID_cCAMsSEQ_FRAME_BOX.jpg: {shown}")
    if not records:
        raise DataError(f"no usable images in {folder}: every image is junk (pid -1)")
    if relabel:
        label = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
        records = [ImageRecord(r.path, label[r.pid], r.camid) for r in records]
    return records


@dataclass
class SplitSummary:
    images: int
    identities: int
    cameras: int


def summarize(records: list[ImageRecord]) -> SplitSummary:
    return SplitSummary(len(records), len({r.pid for r in records}), len({r.camid for r in records}))


def read_train(folder: str | Path | None, num_classes: int) -> list[ImageRecord]:
    """Training records relabelled 0..n-1; their identity count must equal ``num_classes``."""
    if not folder:
        raise DataError("dataset.train_dataset_dir is not set")
    records = read_split(folder, relabel=True)
    identities = len({r.pid for r in records})
    if identities != num_classes:
        raise DataError(f"dataset.num_classes = {num_classes} but {folder} holds {identities} identities; "
                        f"set dataset.num_classes={identities}")
    return records


def read_eval(query_dir: str | Path | None, gallery_dir: str | Path | None
              ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Query and gallery records with their original pids (junk dropped, distractors kept)."""
    if not query_dir:
        raise DataError("no query folder: set dataset.query_dataset_dir")
    if not gallery_dir:
        raise DataError("no gallery folder: set dataset.test_dataset_dir")
    return read_split(query_dir), read_split(gallery_dir)
