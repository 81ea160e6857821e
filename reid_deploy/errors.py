"""The one family of user-facing errors; the CLI turns each into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

EXIT_USER_ERROR = 2


class ReidError(Exception):
    """A problem with what the user gave us (spec, data, model file, key), not a bug."""


class SpecError(ReidError):
    """The spec (YAML file or override) is malformed or holds a value that is not allowed."""


class DataError(ReidError):
    """A dataset folder, image or features file is missing or unusable."""


class ModelFileError(ReidError):
    """A checkpoint, ONNX, engine or index file cannot be loaded or does not fit."""


class EncryptionError(ReidError):
    """A key is missing or wrong, or an encrypted file is damaged."""


class BackendUnavailable(ReidError):
    """An optional runtime (TensorRT, CUDA, faiss-gpu) is not installed or has no device."""


def shown(text: object) -> str:
    """``text`` as it may appear inside one line of an error or log record: control characters, line and
    paragraph separators and other unprintable characters escaped as Python writes them (``\\n``,
    ``\\x1b``, ``\\u2028``), so that user text can neither break the line nor drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def missing_file(path: str | Path, what: str) -> str:
    """The message for a ``what`` file that is not at ``path``: not found, or a folder stands there."""
    shown_path = shown(path)
    return f"{what} {shown_path} is a folder, not a file" if Path(path).is_dir() else f"{what} not found: {shown_path}"
