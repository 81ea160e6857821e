"""Run every benchmark area side by side and record the machine: ``python -m bench.run [--quick]``.

Each area is a module ``bench/bench_<area>.py`` with ``main(quick: bool) -> list[dict]``; each runs in a
fresh process (so peak memory and thread pools do not leak between areas). Results go to
``bench/results/<date>-<host>.json`` and a Markdown table is printed (and saved as ``.md`` beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

AREAS = ("extract", "int8", "rerank", "search", "search_rerank", "train", "serve")
README_AREAS = AREAS[:-1]  # the generated Performance section; README's Serving section quotes the serve area
RESULTS = Path(__file__).parent / "results"
DRIVER = ("import json, sys, importlib; m = importlib.import_module('bench.bench_' + sys.argv[1]); "
          "print('@@RESULT@@' + json.dumps(m.main(quick=sys.argv[2] == '1')))")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    info = {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def run_area(area: str, quick: bool) -> tuple[list[dict], float, str | None]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, area, "1" if quick else "0"], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    seconds = time.perf_counter() - start
    marker = [line for line in done.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if done.returncode != 0 or not marker:
        return [], seconds, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(marker[-1][len("@@RESULT@@"):]), seconds, None


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def latest_full_report(folder: Path = RESULTS) -> dict | None:
    """The newest full run (not quick, every area) saved in ``folder``."""
    reports = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    full = [r for r in reports if not r["quick"] and set(README_AREAS) <= set(r["areas"])]
    return max(full, key=lambda r: r["date"], default=None)


def readme_summary(report: dict) -> str:
    """The Performance section of README: the machine and one compact table per area."""
    m, areas = report["machine"], report["areas"]
    text = [f"Measured by `make bench` on {report['date'][:10]}: {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}, torch {m.get('torch', '?')}. "
            "Medians of repeated runs after a warm-up; every row of a table comes from the same run.\n"]
    extract = [r for r in areas["extract"]["rows"] if "path" not in r]
    disk = [r for r in areas["extract"]["rows"] if "path" in r]
    pivot: dict[tuple[str, str], dict] = {}
    for r in extract:
        cell = pivot.setdefault((r["model"], r["backend"]), {"model": r["model"], "backend": r["backend"],
                                                             "cos_fp32": r["cos_fp32"]})
        cell[f"batch {r['batch']}"] = f"{r['images_per_s']:g} ({r['speedup_vs_eager']:g}x)"
    text.append("\n**Feature extraction**, images/s (speed-up over PyTorch eager), CPU:\n\n"
                + markdown(list(pivot.values())))
    if disk:
        text.append("\n**Disk to features**, images/s: the model alone on a uint8 batch on its device vs `reid "
                    "index build`'s extraction from JPEG files (worker start, decoding, copies included); "
                    "`loader_per_worker`: the uint8 loader alone:\n\n" + markdown(disk))
    text.append("\n**INT8 accuracy** (mAP in %, demo query/gallery, no re-ranking; cosines to FP32 on 16 real "
                "images):\n\n" + markdown(areas["int8"]["rows"]))
    keys = ("dataset", "queries", "gallery", "method", "seconds", "x_floor", "speedup_vs_dense", "peak_mb", "mAP",
            "note")
    text.append("\n**Re-ranked evaluation** (k-reciprocal re-ranking + mAP/CMC, d=1024; `x_floor`: time over one "
                "N x N x d matmul in the same run):\n\n"
                + markdown([{k: r[k] for k in keys if k in r} for r in areas["rerank"]["rows"]]))
    keys = ("gallery", "dim", "index", "build_s", "queries_per_s", "recall@10_vs_flat")
    text.append("\n**Gallery search** (`GalleryIndex.search`, 1,000 queries, top 10; `flat` was FAISS's flat index "
                "until 2026-11-27, its blocked products since):\n\n"
                + markdown([{k: r[k] for k in keys} for r in areas["search"]["rows"]]))
    keys = ("gallery", "graph", "device", "what", "seconds", "x_matmul", "speedup_vs_scratch", "top10_agreement",
            "index_mb", "graph_mb", "weights_mb", "without_graph_mb")
    text.append("\n**Re-ranked gallery search** from the index's cached neighbour graph (d=256, 1,000 queries, top "
                "10, k1=20, k2=6, lambda=0.3; `x_matmul`: time over the queries' q x G x d product in the same "
                "run):\n\n" + markdown([{k: r[k] for k in keys if k in r} for r in areas["search_rerank"]["rows"]]))
    text.append("\n**Training**, images/s (`bare step`: synthetic batch on the device; `trainer`: `reid train`'s "
                "loop with its data loading, `of_bare_step` = trainer / bare step at the same batch):\n\n"
                + markdown(areas["train"]["rows"]))
    return "".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes, for CI smoke runs)")
    parser.add_argument("--areas", nargs="*", default=list(AREAS), choices=AREAS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md results")
    args = parser.parse_args()
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "machine": machine(), "areas": {}}
    text = [f"# Benchmarks {report['date']} ({'quick' if args.quick else 'full'})\n",
            "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()) + "\n"]
    failed = []
    for area in args.areas:
        print(f"== {area} ...", file=sys.stderr, flush=True)
        rows, seconds, error = run_area(area, args.quick)
        report["areas"][area] = {"rows": rows, "seconds": round(seconds, 1), "error": error}
        text.append(f"\n## {area} ({seconds:.0f} s)\n\n" + (f"FAILED: {error}\n" if error else markdown(rows)))
        if error:
            failed.append(area)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{report['machine']['host']}" + ("-quick" if args.quick else "")
    if not set(README_AREAS) <= set(args.areas):  # a partial run never replaces (or passes for) a full one
        stem += "-" + "-".join(args.areas)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text("".join(text))
    print("".join(text))
    print(f"wrote {args.out / stem}.json", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
