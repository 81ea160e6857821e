"""Encrypted model files: round trips, and every kind of damage ends in one clear line and exit 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reid_deploy.crypto import (
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    decrypt_to_bytes,
    encrypt_to_file,
    is_encrypted,
)
from reid_deploy.errors import EncryptionError

KEY = "correct horse battery staple"
CHUNK = 64


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture
def encrypted(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * CHUNK + 17)  # 3 full chunks and a short final one
    path = tmp_path / "model.onnx.enc"
    encrypt_to_file(data, path, KEY, chunk_size=CHUNK)
    return path, data


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 5])
def test_round_trip_any_size(tmp_path: Path, size: int):
    data = os.urandom(size)
    path = tmp_path / "m.enc"
    encrypt_to_file(data, path, KEY, chunk_size=CHUNK)
    assert is_encrypted(path)
    assert decrypt_to_bytes(path, KEY) == data


def test_same_plaintext_encrypts_differently(tmp_path: Path):
    data = b"x" * 200
    encrypt_to_file(data, tmp_path / "a.enc", KEY)
    encrypt_to_file(data, tmp_path / "b.enc", KEY)
    a, b = (tmp_path / "a.enc").read_bytes(), (tmp_path / "b.enc").read_bytes()
    assert a[:8] == b[:8] == MAGIC and a != b  # random salt and nonce


def test_reordered_chunks_are_rejected(encrypted):
    path, _ = encrypted
    raw = path.read_bytes()
    record = CHUNK + TAG_SIZE
    first, second = raw[HEADER_SIZE:HEADER_SIZE + record], raw[HEADER_SIZE + record:HEADER_SIZE + 2 * record]
    path.write_bytes(raw[:HEADER_SIZE] + second + first + raw[HEADER_SIZE + 2 * record:])
    with pytest.raises(EncryptionError, match="chunk 0 failed authentication"):
        decrypt_to_bytes(path, KEY)


def _assert_one_line_exit_2(result, out: Path, expected: str) -> None:
    result.user_error(expected)
    assert KEY not in result.err + result.out
    assert not out.exists()


def test_decrypt_cli_writes_plain_onnx_0600(cli, encrypted, key_file, tmp_path):
    path, data = encrypted
    out = tmp_path / "plain.onnx"
    result = cli("decrypt", path, out, "--key-file", key_file)
    assert result.code == 0, result.err
    assert out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert KEY not in result.out + result.err


def test_decrypt_cli_takes_key_from_env(cli, encrypted, tmp_path, monkeypatch):
    path, data = encrypted
    monkeypatch.setenv("REID_KEY", KEY)
    assert cli("decrypt", path, tmp_path / "p.onnx").code == 0
    assert (tmp_path / "p.onnx").read_bytes() == data


def test_wrong_key_exits_2_with_one_line(cli, encrypted, tmp_path):
    path, _ = encrypted
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not the key")
    out = tmp_path / "plain.onnx"
    _assert_one_line_exit_2(cli("decrypt", path, out, "--key-file", wrong), out, "wrong key")


@pytest.mark.parametrize("where", ["header", "first chunk", "last tag"])
def test_flipped_bit_exits_2_with_one_line(cli, encrypted, key_file, tmp_path, where):
    path, _ = encrypted
    raw = bytearray(path.read_bytes())
    index = {"header": 20, "first chunk": HEADER_SIZE + 3, "last tag": len(raw) - 1}[where]
    raw[index] ^= 0x04
    path.write_bytes(bytes(raw))
    out = tmp_path / "plain.onnx"
    expected = "header is damaged" if where == "header" else "failed authentication"
    _assert_one_line_exit_2(cli("decrypt", path, out, "--key-file", key_file), out, expected)


@pytest.mark.parametrize("cut", ["mid header", "at chunk boundary", "mid chunk", "last byte"])
def test_truncated_file_exits_2_with_one_line(cli, encrypted, key_file, tmp_path, cut):
    path, _ = encrypted
    raw = path.read_bytes()
    length = {"mid header": HEADER_SIZE - 5, "at chunk boundary": HEADER_SIZE + 2 * (CHUNK + TAG_SIZE),
              "mid chunk": HEADER_SIZE + CHUNK, "last byte": len(raw) - 1}[cut]
    path.write_bytes(raw[:length])
    out = tmp_path / "plain.onnx"
    expected = "failed authentication" if cut == "last byte" else "truncated"
    _assert_one_line_exit_2(cli("decrypt", path, out, "--key-file", key_file), out, expected)


def test_not_encrypted_and_no_key_exit_2(cli, tmp_path, key_file, monkeypatch):
    monkeypatch.delenv("REID_KEY", raising=False)
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(b"\x08\x07 not encrypted")
    out = tmp_path / "out.onnx"
    _assert_one_line_exit_2(cli("decrypt", plain, out, "--key-file", key_file), out, "not a reid-deploy")
    _assert_one_line_exit_2(cli("decrypt", plain, out), out, "no key")


def test_header_asking_for_huge_scrypt_memory_is_refused_before_deriving(cli, encrypted, key_file, tmp_path):
    from reid_deploy.crypto import _FIELDS

    path, _ = encrypted
    raw = bytearray(path.read_bytes())
    fields = list(_FIELDS.unpack(bytes(raw[:_FIELDS.size])))
    fields[3], fields[4] = 22, 32  # log2 N, r: 16 GiB of scrypt memory
    raw[:_FIELDS.size] = _FIELDS.pack(*fields)
    path.write_bytes(bytes(raw))
    out = tmp_path / "plain.onnx"
    _assert_one_line_exit_2(cli("decrypt", path, out, "--key-file", key_file), out, "implausible key-derivation")
