import json
import subprocess
import sys

import numpy as np
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


def test_the_script_exit_loses_no_output(cli, tmp_path):
    """``run`` ends the process without the interpreter's teardown: everything printed into a pipe and every
    record of the run's log still arrives, and the exit code is the command's."""
    reference = cli("spec", "reference")
    done = subprocess.run([sys.executable, "-m", "reid_deploy", "spec", "reference"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == reference.out and len(done.stdout) > 10_000
    data = tmp_path / "data"
    assert cli("demo-data", data, "--ids", "4", "--cams", "2", "--seed", "1").code == 0
    done = subprocess.run([sys.executable, "-m", "reid_deploy", "dataset-summary", "-e", "specs/demo.yaml",
                           "dataset.num_classes=4", f"results_dir={tmp_path}",
                           f"dataset.train_dataset_dir={data / 'bounding_box_train'}",
                           f"dataset.test_dataset_dir={data / 'bounding_box_test'}",
                           f"dataset.query_dataset_dir={data / 'query'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gallery" in done.stdout
    assert len((tmp_path / "dataset_summary" / "status.json").read_text().splitlines()) == 3


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


def test_usage_errors_are_one_line(cli):
    result = cli("search", "--index", "i", "--model", "m", "--query", "q", "--out", "o", "--top-k", "0")
    result.user_error("--top-k", "reid search --help")
    cli("nosuch").user_error("No such command")


def test_demo_data_into_a_file(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    cli("demo-data", tmp_path / "afile", "--ids", "2", "--cams", "2").user_error("is a file")


def test_atomic_write_to_a_folder_names_it(tmp_path):
    from reid_deploy.errors import ReidError
    from reid_deploy.files import write_text_atomic

    with pytest.raises(ReidError, match="it is a folder"):
        write_text_atomic(tmp_path, "x")


def test_damaged_checkpoint_and_features_files(cli, tmp_path, tiny_overrides):
    features = tmp_path / "f.npz"
    features.write_bytes(b"PK\x03\x04" + b"\0" * 50)  # a zip header and nothing behind it
    cli("evaluate", "--features", features).user_error("cannot read features file")
    checkpoint = tmp_path / "m.pth"
    checkpoint.write_bytes(b"\x80\x02]q\x00.")  # a pickle of an empty list, not a zip checkpoint
    cli("inference", "-e", "specs/demo.yaml", *tiny_overrides, f"inference.checkpoint={checkpoint}").user_error("m.pth")


def test_a_folder_where_a_file_belongs_is_named_as_such(cli, tmp_path):
    cli("spec", "validate", tmp_path).user_error("spec file", "is a folder, not a file")
    cli("evaluate", "--features", tmp_path).user_error("features file", "is a folder, not a file")


def test_missing_optional_library_names_the_extra(cli, tmp_path, monkeypatch):
    gallery = tmp_path / "gallery.npz"
    feats = np.eye(4, 8, dtype=np.float32)
    np.savez(gallery, gallery_feats=feats, gallery_paths=np.array([f"{i:04d}_c1s1_000001_00.jpg" for i in range(4)]))
    monkeypatch.setitem(sys.modules, "faiss", None)  # as where faiss-cpu is not installed
    result = cli("index", "build", "--features", gallery, "--out", tmp_path / "g.index", "index.index_type=hnsw")
    result.user_error("faiss is not installed", "reid-deploy[cpu]")
    assert not (tmp_path / "g.index").exists()
    # a flat index (the default) and its exact search need no faiss
    assert cli("index", "build", "--features", gallery, "--out", tmp_path / "g.index").code == 0
    np.savez(tmp_path / "q.npz", query_feats=feats[:2], query_paths=np.array(["a.jpg", "b.jpg"]))
    assert cli("search", "--index", tmp_path / "g.index", "--query-features", tmp_path / "q.npz", "--top-k", 1,
               "--out", tmp_path / "r.json").code == 0
    matches = [r["matches"][0]["path"] for r in json.loads((tmp_path / "r.json").read_text())["results"]]
    assert matches == ["0000_c1s1_000001_00.jpg", "0001_c1s1_000001_00.jpg"]
