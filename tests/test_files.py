"""Atomic writes keep the previous file on any failure; run records never hold the key."""

import errno
import json
import subprocess
import sys

import pytest

from reid_deploy.errors import ReidError
from reid_deploy.files import RunRecord, atomic_path, write_bytes_atomic
from reid_deploy.spec import load_spec


def test_error_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "model.bin"
    write_bytes_atomic(target, b"version 1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of version 2")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"version 1"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_full_disk_is_a_clear_error_and_keeps_previous_file(tmp_path):
    target = tmp_path / "index.faiss"
    write_bytes_atomic(target, b"old index")
    with pytest.raises(ReidError, match="disk full while writing .*index.faiss; the previous file was kept"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old index"


def test_sigkill_during_write_keeps_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pth"
    write_bytes_atomic(target, b"good checkpoint")
    script = (
        "import os, signal, sys\n"
        "from reid_deploy.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'torn')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert done.returncode == -9
    assert target.read_bytes() == b"good checkpoint"


def test_mode_is_applied(tmp_path):
    target = tmp_path / "secret.onnx"
    write_bytes_atomic(target, b"x", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_run_record_redacts_key_and_appends_status(tmp_path):
    spec = load_spec(None, [f"results_dir={tmp_path}", "encryption_key=hunter2-secret"])
    record = RunRecord(spec, "evaluate")
    record.status(step="a", value=1.5)
    record.status(step="b")
    assert "hunter2-secret" not in (tmp_path / "evaluate" / "experiment.yaml").read_text()
    lines = (tmp_path / "evaluate" / "status.json").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == ["a", "b"]
