"""`reid train` end to end on the tiny model: outputs, resume, kill-and-resume, bad images, unsafe files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reid_deploy.model.checkpoint import load_model_file, read_checkpoint
from reid_deploy.spec import load_spec
from reid_deploy.train.trainer import run_train

ROOT = Path(__file__).parents[1]
DEMO_SPEC = ROOT / "specs" / "demo.yaml"
FAST = ["train.optim.warmup_epochs=1", "train.optim.lr_steps=[2]", "train.deterministic=True",
        "train.validation_interval=0"]


def _status(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "status.json").read_text().splitlines()]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_writes_checkpoints_status_and_validation(cli, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    result = cli("-q", "train", "-e", DEMO_SPEC, *tiny_overrides, f"train.results_dir={out}", *FAST,
                 "train.num_epochs=2", "train.checkpoint_interval=1", "train.validation_interval=2")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.glob("*.pth")) == ["reid_model_epoch_001.pth", "reid_model_epoch_002.pth",
                                                         "reid_model_latest.pth"]
    lines = _status(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert {"mAP", "cmc_rank_1", "cmc_rank_5", "cmc_rank_10"} <= lines[0].keys() <= lines[2].keys()
    assert {"loss", "id_loss", "metric_loss", "acc", "lr", "seconds"} <= lines[1].keys()
    assert "mAP" not in lines[1]
    data = read_checkpoint(out / "reid_model_latest.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "spec"} <= data.keys()
    assert data["epoch"] == 2
    model, spec = load_model_file(out / "reid_model_epoch_002.pth")
    assert model(torch.zeros(1, 3, 64, 32)).shape == (1, spec.model.feat_dim)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_overrides, tmp_path):
    common = [*tiny_overrides, *FAST, "train.num_epochs=2", "train.checkpoint_interval=1",
              "model.with_center_loss=True"]
    whole = run_train(load_spec(DEMO_SPEC, [*common, f"train.results_dir={tmp_path / 'whole'}"]))
    first = tmp_path / "whole" / "reid_model_epoch_001.pth"
    resumed = run_train(load_spec(DEMO_SPEC, [*common, f"train.results_dir={tmp_path / 'resumed'}",
                                              f"train.resume_training_checkpoint_path={first}"]))
    assert [h["epoch"] for h in resumed.history] == [2]
    assert _same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert _same_weights(read_checkpoint(whole.checkpoint)["center"], read_checkpoint(resumed.checkpoint)["center"])


def _cli_process(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "reid_deploy", "-q", "train", "-e", str(DEMO_SPEC), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_overrides, tmp_path):
    common = [*tiny_overrides, *FAST, "train.num_epochs=3", "train.checkpoint_interval=1",
              "dataset.num_workers=1"]
    reference = _cli_process([*common, f"train.results_dir={tmp_path / 'ref'}"])
    killed_dir = tmp_path / "killed"
    victim = _cli_process([*common, f"train.results_dir={killed_dir}"])
    deadline = time.monotonic() + 120
    while not (killed_dir / "reid_model_latest.pth").exists() and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # in epoch 2, after the epoch-1 checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "reid_model_epoch_003.pth").exists()
    resumed = _cli_process([*common, f"train.results_dir={killed_dir}",
                            f"train.resume_training_checkpoint_path={killed_dir / 'reid_model_latest.pth'}"])
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert [line["epoch"] for line in _status(killed_dir)] == [1, 2, 3]
    assert _same_weights(read_checkpoint(tmp_path / "ref" / "reid_model_latest.pth")["model"],
                         read_checkpoint(killed_dir / "reid_model_latest.pth")["model"])


@pytest.fixture
def train_with_bad_image(demo_dir, tmp_path) -> Path:
    train = tmp_path / "train"
    shutil.copytree(demo_dir / "bounding_box_train", train)
    victim = sorted(train.iterdir())[3]
    victim.write_bytes(b"not an image at all")
    return victim


def test_bad_image_mid_epoch_is_skipped_with_a_warning(cli, tiny_overrides, tmp_path, train_with_bad_image):
    args = ["-q", "train", "-e", DEMO_SPEC, *tiny_overrides, f"dataset.train_dataset_dir={train_with_bad_image.parent}",
            f"train.results_dir={tmp_path / 'out'}", "train.num_epochs=1", "train.validation_interval=0"]
    result = cli(*args)
    assert result.code == 0, result.err
    assert train_with_bad_image.name in result.err
    assert len(_status(tmp_path / "out")) == 1
    failed = cli(*args, "dataset.on_bad_image=error")
    assert failed.code == 2 and train_with_bad_image.name in failed.err


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("key,choice", [("train.resume_training_checkpoint_path", "''"),
                                        ("model.pretrained_model_path", "self")])
def test_malicious_pickle_checkpoint_is_refused_and_not_run(cli, tiny_overrides, tmp_path, key, choice):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, evil)
    result = cli("-q", "train", "-e", DEMO_SPEC, *tiny_overrides, f"train.results_dir={tmp_path / 'out'}",
                 f"model.pretrain_choice={choice}", f"{key}={evil}", "train.num_epochs=1")
    assert result.code == 2 and "refusing to load" in result.err
    assert not marker.exists()


def test_seed_spec_with_dataset_paths_overridden_starts_training(cli, tiny_overrides, tmp_path):
    seed_spec = ROOT / "specs" / "market1501_swin_tiny.yaml"
    result = cli("-q", "train", "-e", seed_spec, *tiny_overrides, f"results_dir={tmp_path}", "model.pretrain_choice=''",
                 "train.num_epochs=1", "dataset.pixel_mean=[0.5,0.5,0.5]")
    assert result.code == 0, result.err
    assert (tmp_path / "train" / "reid_model_epoch_001.pth").is_file()
