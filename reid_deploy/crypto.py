"""Encrypted model files: AES-256-GCM in authenticated chunks, key from a passphrase through scrypt.

File layout (version 1, all integers big-endian)::

    header  = MAGIC (8) | version (1) | kdf id (1: scrypt) | log2 N (1) | r (1) | p (1)
              | chunk size (4) | salt (16) | base nonce (12) | header MAC (16)
    records = one per chunk: ciphertext of the chunk + 16-byte GCM tag

scrypt derives 64 bytes from the passphrase and salt: the first 32 are the AES-256 key, the last 32 key
an HMAC-SHA256 over the header (truncated to 16 bytes), so a wrong passphrase is told apart from a
damaged body before anything is decrypted. Chunk ``i`` uses the nonce ``base nonce XOR i`` (in the low
8 bytes) and the associated data ``header | i | final flag``: reordered, dropped or swapped chunks fail
authentication, and the last record must carry the final flag, so a file cut at a chunk boundary is
detected too. Every chunk but the last is exactly ``chunk size`` bytes; the last is shorter (possibly
empty). Encryption and ``decrypt_to_file`` stream one chunk at a time, so a 400 MB model is never held
twice; ``decrypt_to_bytes`` joins the decrypted chunks into the one ``bytes`` object ONNX Runtime and
TensorRT take (for that moment, about twice the model).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from reid_deploy.errors import EncryptionError, ModelFileError, missing_file
from reid_deploy.files import atomic_path

MAGIC = b"REIDENC\x00"
VERSION = 1
KDF_SCRYPT = 1
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB, ~0.1 s: slows passphrase guessing
CHUNK_SIZE = 1 << 20
TAG_SIZE = 16
_FIELDS = struct.Struct(">8sBBBBBI16s12s")
HEADER_SIZE = _FIELDS.size + 16
ENCRYPTED_SUFFIX = ".enc"


def is_encrypted(path: str | Path) -> bool:
    """True when the file starts with the encrypted-model magic (whatever its name)."""
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def encrypt_to_file(data: bytes | BinaryIO, path: str | Path, passphrase: str,
                    chunk_size: int = CHUNK_SIZE) -> None:
    """Encrypt ``data`` (bytes or a binary stream) into ``path``, atomically; streamed chunk by chunk."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as dst:
        encrypt_stream(src, dst, passphrase, chunk_size)


def encrypt_stream(src: BinaryIO, dst: BinaryIO, passphrase: str, chunk_size: int = CHUNK_SIZE) -> None:
    """Write the header and the encrypted records of ``src`` to ``dst``."""
    if not passphrase:
        raise EncryptionError("the encryption key is empty")
    if not 0 < chunk_size < 1 << 32:
        raise ValueError(f"chunk_size must be in 1..2**32-1, not {chunk_size}")
    salt, base_nonce = os.urandom(16), os.urandom(12)
    fields = _FIELDS.pack(MAGIC, VERSION, KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, chunk_size, salt,
                          base_nonce)
    enc_key, mac_key = _derive(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    header = fields + _mac(mac_key, fields)
    dst.write(header)
    aes = AESGCM(enc_key)
    counter = 0
    while True:
        chunk = src.read(chunk_size)
        final = len(chunk) < chunk_size
        dst.write(aes.encrypt(_nonce(base_nonce, counter), chunk, _aad(header, counter, final)))
        if final:
            return
        counter += 1


def decrypt_to_bytes(path: str | Path, passphrase: str) -> bytes:
    """The plaintext of an encrypted file, in memory only; EncryptionError when it cannot be trusted."""
    return b"".join(_decrypted_chunks(Path(path), passphrase))


def decrypt_to_file(path: str | Path, out: str | Path, passphrase: str) -> None:
    """Decrypt to ``out`` (atomic, mode 0600); on any failure no output is left behind."""
    with atomic_path(out, mode=0o600) as tmp, open(tmp, "wb") as dst:
        dst.writelines(_decrypted_chunks(Path(path), passphrase))


def _decrypted_chunks(path: Path, passphrase: str) -> Iterator[bytes]:
    if not path.is_file():
        raise EncryptionError(missing_file(path, "encrypted file"))
    if not passphrase:
        raise EncryptionError(f"{path} is encrypted: give the key with --key-file, $REID_KEY or "
                              f"encryption_key")
    with open(path, "rb") as fh:
        header = fh.read(HEADER_SIZE)
        if header[:len(MAGIC)] != MAGIC:
            raise EncryptionError(f"{path} is not a reid-deploy encrypted file (no header)")
        if len(header) < HEADER_SIZE:
            raise EncryptionError(f"{path} is truncated (incomplete header)")
        _magic, version, kdf, log2_n, r, p, chunk_size, salt, base_nonce = _FIELDS.unpack(header[:_FIELDS.size])
        if version != VERSION or kdf != KDF_SCRYPT:
            raise EncryptionError(f"{path} uses encryption format version {version} (kdf {kdf}); this "
                                  f"reid-deploy reads version {VERSION}")
        # read before the header is authenticated: bound scrypt's memory (128 r N bytes) to 1 GiB
        if not (10 <= log2_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16 and chunk_size > 0
                and 128 * r << log2_n <= 1 << 30):
            raise EncryptionError(f"{path} has a damaged header (implausible key-derivation parameters)")
        enc_key, mac_key = _derive(passphrase, salt, log2_n, r, p)
        if not hmac.compare_digest(_mac(mac_key, header[:_FIELDS.size]), header[_FIELDS.size:]):
            raise EncryptionError(f"wrong key for {path} (or its header is damaged)")
        aes = AESGCM(enc_key)
        record = chunk_size + TAG_SIZE
        counter = 0
        while True:
            data = fh.read(record)
            if not data:
                raise EncryptionError(f"{path} is truncated (its last chunk is missing)")
            final = len(data) < record
            if final and len(data) < TAG_SIZE:
                raise EncryptionError(f"{path} is truncated (chunk {counter} is incomplete)")
            try:
                yield aes.decrypt(_nonce(base_nonce, counter), data, _aad(header, counter, final))
            except InvalidTag:
                raise EncryptionError(f"{path} is damaged or truncated: chunk {counter} failed "
                                      f"authentication") from None
            if final:
                return
            counter += 1


def _derive(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    key = Scrypt(salt=salt, length=64, n=1 << log2_n, r=r, p=p).derive(passphrase.encode("utf-8"))
    return key[:32], key[32:]


def _mac(mac_key: bytes, fields: bytes) -> bytes:
    return hmac.new(mac_key, fields, hashlib.sha256).digest()[:16]


def _nonce(base_nonce: bytes, counter: int) -> bytes:
    low = int.from_bytes(base_nonce[4:], "big") ^ counter
    return base_nonce[:4] + low.to_bytes(8, "big")


def _aad(header: bytes, counter: int, final: bool) -> bytes:
    return header + struct.pack(">QB", counter, int(final))


def read_model_bytes(path: str | Path, key: str | None = None) -> bytes:
    """The ONNX bytes of a plain or encrypted model file (decrypted in memory only)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "model file"))
    if is_encrypted(path):
        if not key:
            raise EncryptionError(f"{path} is encrypted: give the key with --key-file, $REID_KEY or "
                                  f"encryption_key")
        return decrypt_to_bytes(path, key)
    if path.name.lower().endswith(".enc"):
        raise EncryptionError(f"{path} is named .enc but is not a reid-deploy encrypted file")
    return path.read_bytes()
