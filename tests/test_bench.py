"""`make bench-quick` as a smoke check: every area runs and reports rows (speeds are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_bench_quick_reports_every_area(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    assert report["quick"] is True and report["machine"]["cores"] >= 1
    assert set(report["areas"]) == {"extract", "int8", "rerank", "search", "search_rerank", "train", "serve"}
    for area, result in report["areas"].items():
        assert result["error"] is None, area
        assert result["rows"], area
    extract = report["areas"]["extract"]["rows"]
    assert {r["batch"] for r in extract} == {1, 8, 32}
    assert all(r["images_per_s"] > 0 and r["cos_fp32"] > 0.98 for r in extract)
    int8 = {r["artefact"]: r for r in report["areas"]["int8"]["rows"]}
    assert set(int8) == {"onnxruntime fp32", "onnxruntime int8 dynamic", "onnxruntime int8 static"}
    assert all(0 <= r["mAP"] <= 100 and r["min_cosine"] > 0.9 for r in int8.values())
    rerank = {r["method"]: r for r in report["areas"]["rerank"]["rows"]}
    assert rerank["reid_deploy (exact kNN)"]["mAP"] == rerank["published dense reference"]["mAP"]
    assert rerank["reid evaluate --features (whole command)"]["x_floor"] > 1
    assert "| flat |" in next(tmp_path.glob("*-quick.md")).read_text()
    cached = [r for r in report["areas"]["search_rerank"]["rows"] if r["what"] == "re-ranked search, cached graph"]
    compared = [r for r in cached if "top10_agreement" in r]
    assert compared and all(r["top10_agreement"] == 1.0 and r["identical_rankings"] for r in compared)
    assert all(r["gallery_pass_s"] > 0 and r["set_algebra_s"] > 0 for r in cached)
    serve = report["areas"]["serve"]["rows"]
    service = [r for r in serve if r["what"] == "service"]
    assert {(r["rerank"], r["clients"]) for r in service} == {(False, 1), (False, 8), (True, 1), (True, 8)}
    assert all(r["failures"] == 0 and r["queries_per_s"] > 0 for r in service)
    assert any(r["what"] == "service, 10 % adds" and r["adds_per_s"] > 0 for r in serve)
