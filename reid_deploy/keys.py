"""Encryption-key resolution, in one place: --key-file, then $REID_KEY, then the spec's encryption_key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from reid_deploy.errors import EncryptionError, missing_file

KEY_ENV = "REID_KEY"


def resolve_key(key_file: Optional[str | Path] = None, spec_key: Optional[str] = None) -> Optional[str]:
    """The passphrase to use, or None when none is given anywhere. Never logged or printed."""
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise EncryptionError(missing_file(path, "key file"))
        key = path.read_text(encoding="utf-8").strip("\r\n")
        if not key:
            raise EncryptionError(f"key file is empty: {path}")
        return key
    env_key = os.environ.get(KEY_ENV)
    if env_key:
        return env_key
    return spec_key or None
