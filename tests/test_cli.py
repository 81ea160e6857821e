import subprocess
import sys

import pytest

COMMANDS = [[], ["spec"], ["spec", "validate"], ["spec", "show"], ["spec", "reference"], ["demo-data"],
            ["dataset-summary"], ["train"], ["evaluate"], ["inference"], ["export"], ["decrypt"],
            ["build-engine"], ["index"], ["index", "build"], ["index", "add"], ["search"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "reid")
def test_every_command_has_help(cli, command):
    result = cli(*command, "--help")
    assert result.code == 0
    assert "Usage: reid" in result.out


def test_console_script_runs_as_a_process():
    """The installed entry point, not just the in-process app."""
    done = subprocess.run([sys.executable, "-m", "reid_deploy", "spec", "validate", "specs/demo.yaml",
                           "model.backbone=vit_huge"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: spec error: model.backbone")
    assert "Traceback" not in done.stderr


def test_demo_data_and_summary(cli, tmp_path):
    out = tmp_path / "data"
    result = cli("demo-data", out, "--ids", "5", "--cams", "3", "--seed", "2")
    assert result.code == 0 and (out / "query").is_dir()
    summary = cli("dataset-summary", "-e", "specs/demo.yaml", "dataset.num_classes=5", f"results_dir={tmp_path}",
                  f"dataset.train_dataset_dir={out / 'bounding_box_train'}",
                  f"dataset.test_dataset_dir={out / 'bounding_box_test'}",
                  f"dataset.query_dataset_dir={out / 'query'}")
    assert summary.code == 0
    assert "train" in summary.out and "gallery" in summary.out
    assert (tmp_path / "dataset_summary" / "experiment.yaml").is_file()
    assert len((tmp_path / "dataset_summary" / "status.json").read_text().splitlines()) == 3


def test_missing_dataset_is_one_line(cli, tmp_path):
    result = cli("dataset-summary", "-e", "specs/demo.yaml", f"dataset.train_dataset_dir={tmp_path / 'nope'}")
    assert result.code == 2
    assert result.err.count("\n") == 1 and "not found" in result.err


def test_usage_error_exits_2(cli):
    assert cli("spec", "validate").code == 2
