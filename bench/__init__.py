"""Benchmarks (``python -m bench.run``); the models they share, as overrides of the demo spec."""

from pathlib import Path

DEMO_SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"
SWIN_T = ["model.backbone=swin_tiny_patch4_window7_224", "model.backbone_args={}", "model.feat_dim=1024"]
TALL = ["model.input_height=384", "model.input_width=128"]  # the seed spec's input size
