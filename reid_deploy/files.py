"""Atomic file writes and the per-command run record (experiment.yaml + status.json)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from reid_deploy.errors import ReidError


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A crash or error leaves the previous file untouched and removes the temporary one.
    """
    path = Path(path)
    if path.is_dir():
        raise ReidError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ReidError(f"cannot write {path}: a file stands where its folder should be") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ReidError(f"disk full while writing {path}; the previous file was kept") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644) -> None:
    write_bytes_atomic(path, text.encode(), mode)


class RunRecord:
    """The output folder of one command: ``experiment.yaml`` (key redacted) and ``status.json`` lines."""

    def __init__(self, spec: Any, command: str, write: bool = True):
        from reid_deploy.spec import to_yaml

        self.dir = spec.command_dir(command)
        self.command = command
        self.write = write  # False on non-zero DDP ranks: only rank 0 writes
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / "experiment.yaml", to_yaml(spec, redact=True))

    def status(self, **fields: Any) -> None:
        """Append one JSON object to ``status.json``."""
        if not self.write:
            return
        entry = {"time": round(time.time(), 3), "command": self.command, **fields}
        with open(self.dir / "status.json", "a") as fh:
            fh.write(json.dumps(entry, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
