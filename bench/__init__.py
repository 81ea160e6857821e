"""Benchmarks (``python -m bench.run``); the models they share, as overrides of the demo spec, and a row printer."""

import json
import sys
from pathlib import Path

DEMO_SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"
SWIN_T = ["model.backbone=swin_tiny_patch4_window7_224", "model.backbone_args={}", "model.feat_dim=1024"]
TALL = ["model.input_height=384", "model.input_width=128"]  # the seed spec's input size


def shown(rows: list[dict]) -> list[dict]:
    """``rows``, also written to stderr as they come (JSON lines: the progress of a long run)."""
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows
