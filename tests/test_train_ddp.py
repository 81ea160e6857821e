"""Two-process DDP training on CPU (gloo) through torchrun: only rank 0 writes, ranks end identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
WORKER = """
import os, sys, torch
from reid_deploy.spec import load_spec
from reid_deploy.train.trainer import run_train
result = run_train(load_spec(sys.argv[1], sys.argv[3:]))
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_process_ddp_trains_rank0_writes_and_ranks_agree(tiny_overrides, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "train"
    overrides = [*tiny_overrides, f"train.results_dir={out}", "train.num_epochs=2", "train.checkpoint_interval=1",
                 "dataset.batch_size=8", "model.with_center_loss=True", "train.device=cpu",
                 "train.validation_interval=0", "dataset.num_workers=1"]  # a persistent loader process per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(ROOT / "specs" / "demo.yaml"), str(tmp_path), *overrides],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "status.json").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # one writer: no duplicate lines
    assert sorted(p.name for p in out.iterdir()) == ["experiment.yaml", "reid_model_epoch_001.pth",
                                                     "reid_model_epoch_002.pth", "reid_model_latest.pth",
                                                     "status.json"]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(out / "reid_model_latest.pth", weights_only=True)["model"]
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)
    assert len(saved["classifier.weight"]) == 8 and lines[-1]["loss"] > 0
