"""Shared fixtures: a small synthetic dataset, a tiny-model spec and an in-process CLI runner."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from reid_deploy.cli import main

os.environ.setdefault("OMP_NUM_THREADS", "2")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one record per request otherwise

# Property tests draw the same examples for the same commit (a failure is found every time or never) and keep
# no example database between runs; ``--hypothesis-profile=random`` (or HYPOTHESIS_PROFILE=random) searches
# with fresh random draws and remembers what it finds.
settings.register_profile("derandomized", derandomize=True, database=None)
settings.register_profile("random", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))

# A Swin-T-shaped backbone, slimmed so that tests run in seconds on 2 CPU cores.
TINY_SWIN = "model.backbone_args={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2]}"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def user_error(self, *expected: str) -> str:
        """Assert the project's bad-input contract: exit 2 and one ``error:`` line holding ``expected``."""
        assert self.code == 2, self.err
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and all(e in lines[0] for e in expected), self.err
        return lines[0]


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    """Servers and brokers a test started (bench.processes) are killed by their pid when it ends, failed or not
    (those of module fixtures, started before, are stopped by their fixtures)."""
    from bench.processes import STARTED, stop_all

    before = len(STARTED)
    yield
    stop_all(before)


@pytest.fixture
def cli(capsys):
    """Run ``reid ARGS`` in-process through the real entry point; returns exit code and output."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Market-1501-layout demo data: 8 train and 8 test identities over 3 cameras."""
    from reid_deploy.data.synthetic import generate_demo_data

    out = tmp_path_factory.mktemp("demo")
    generate_demo_data(out, ids=8, cams=3, seed=1, images_per_camera=2, distractors=4, junk=3)
    return out


@pytest.fixture(scope="session")
def tiny_overrides(demo_dir: Path, tmp_path_factory) -> list[str]:
    """Overrides that point specs/demo.yaml at ``demo_dir`` with a tiny Swin and a 64x32 input."""
    results = tmp_path_factory.mktemp("results")
    return [f"results_dir={results}", "model.backbone=swin_tiny_patch4_window7_224", TINY_SWIN,
            "model.input_height=64", "model.input_width=32",
            "model.feat_dim=32", "dataset.num_classes=8", "dataset.batch_size=16", "dataset.num_workers=0",
            "dataset.val_batch_size=16",
            f"dataset.train_dataset_dir={demo_dir / 'bounding_box_train'}",
            f"dataset.test_dataset_dir={demo_dir / 'bounding_box_test'}",
            f"dataset.query_dataset_dir={demo_dir / 'query'}"]


@pytest.fixture(scope="session")
def tiny_spec(tiny_overrides):
    from reid_deploy.spec import load_spec

    return load_spec(Path(__file__).parents[1] / "specs" / "demo.yaml", tiny_overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_spec, tmp_path_factory) -> Path:
    """An untrained tiny model saved as a reid-deploy checkpoint (BN statistics warmed on noise)."""
    import torch

    from reid_deploy.model.checkpoint import save_checkpoint
    from reid_deploy.model.reid_model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_spec)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 32))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model.eval(), tiny_spec, epoch=0)
    return path


@pytest.fixture(scope="session")
def other_checkpoint(tiny_spec, tmp_path_factory) -> Path:
    """A second tiny model: same spec, other weights."""
    import torch

    from reid_deploy.model.checkpoint import save_checkpoint
    from reid_deploy.model.reid_model import build_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other") / "other.pth"
    save_checkpoint(path, build_model(tiny_spec).eval(), tiny_spec, epoch=0)
    return path
