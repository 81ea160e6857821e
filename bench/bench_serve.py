"""The search service (``reid serve``) under load, beside the library in-process and the bare product.

A gallery of clustered synthetic features (d=256; ``bench_rerank.synthetic_features``) with its exact
neighbour graph, served by a real ``reid serve`` process on a loopback port. A closed-loop load generator
in this process (asyncio + httpx) runs C concurrent clients (1, 8, 32), each sending one-query requests
(base64 float32 features, top 10) and waiting for each answer, bounded by REQUESTS per client and
SECONDS per row. Rows, all in one run:
- service, plain and re-ranked, per C: queries/s, p50/p95/p99 latency, mean batch the service formed;
- the same queries through ``Searcher.search`` in-process at the batch sizes formed (1 and the mean);
- the bare limit: one torch product + top-k over the features held in memory (batch 1 and 32);
- one ``reid search`` process per query (the command users ran before the service), plain and re-ranked;
- adds mixed in (10 % of requests add one item), 32 clients: adds/s and search latency;
- a retention delete of the oldest 10 % (``DELETE /v1/items {"before"}``), with one client searching
  meanwhile: seconds, and the search latency during it;
- ingestion from a real Redis server and a real mosquitto broker (``reid serve --ingest``): DeepStream
  messages (nv.Frame JSON, 4 embeddings each) published at once, embeddings/s until the service holds them,
  and the latency of one client searching meanwhile;
- the service's peak resident memory beside the index file's size.
The search rows are measured again at 1,000,000 items (graph by ``index.graph=hnsw``). Quick mode: 5,000
items, 1 and 8 clients, 60 requests each. ``python -m bench.bench_serve [--quick] [--gallery=N]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_rerank import synthetic_features
from bench.processes import REID, Served, mosquitto, redis_server
from reid_deploy.retrieval.index import GalleryIndex, IndexParams
from reid_deploy.serve.service import encode_feats

DIM, TOP_K = 256, 10
REQUESTS, SECONDS = 400, 20.0

OBJECTS_PER_FRAME = 4  # embeddings in each DeepStream message of the ingest rows


def main(quick: bool, sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Every row at 100,000 items (exact graph); the search rows again at 1,000,000 (hnsw graph). Quick: 5,000."""
    rows = []
    for n in sizes or ((5_000,) if quick else (100_000, 1_000_000)):
        rows += _gallery_rows(n, quick, every_row=n <= 100_000)
    return rows


def _gallery_rows(n: int, quick: bool, every_row: bool) -> list[dict]:
    """The rows of one gallery size; without ``every_row`` only the searches (service, library, bare limit,
    one reid search process)."""
    clients = (1, 8) if quick else (1, 8, 32)
    requests = 60 if quick else REQUESTS
    graph = "exact" if n <= 100_000 else "hnsw"
    queries, feats, *_ = synthetic_features(2000, n, DIM, seed=3, ids=n // 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index_path = Path(tmp) / "g.index"
        build_s = _build_index(feats, index_path, graph)
        rows.append({"what": f"index build ({graph} graph + weights)", "gallery": n, "seconds": round(build_s, 1),
                     "index_mb": round(index_path.stat().st_size / 2**20, 1)})
        rows += _cli_rows(index_path, queries, Path(tmp), n)
        redis, mqtt = redis_server(Path(tmp)), mosquitto(Path(tmp))
        ingest = ["--ingest", f"redis://127.0.0.1:{redis.port}/ds-events", "--ingest",
                  f"mqtt://127.0.0.1:{mqtt.port}/deepstream/events"] if every_row else []
        server = Served(index_path, "serve.max_batch_delay_ms=2", f"results_dir={tmp}", *ingest,
                        env={"OMP_NUM_THREADS": str(os.cpu_count())})
        try:
            for rerank in (False, True):
                for c in clients:
                    rows.append(_load_row(server, queries, c, requests, rerank, n))
            if every_row:
                rows.append(_load_row(server, queries, clients[-1], requests, False, n, add_share=0.1, feats=feats))
                rows.append(_retention_row(server, queries, n))
                for kind, broker in (("redis", redis), ("mqtt", mqtt)):
                    rows.append(_ingest_row(server, kind, broker.port, queries, feats, 200 if quick else 1000, n))
            rows.append({"what": "service memory", "gallery": n, "peak_rss_mb": _peak_mb(server),
                         "index_mb": round(index_path.stat().st_size / 2**20, 1)})
        finally:
            server.stop()
            redis.stop()
            mqtt.stop()
        rows += _library_rows(index_path, queries, rows, n)
    return rows


def _build_index(feats: np.ndarray, path: Path, graph: str) -> float:
    """An index with its neighbour graph; items carry times 0..n-1 (the retention row deletes the oldest)."""
    start = time.perf_counter()
    index = GalleryIndex(DIM, {}, IndexParams(graph_k=32, graph=graph))
    index.add(feats, [f"g{i}" for i in range(len(feats))])
    index.service = {"log_seq": 0, "items": [{"camera": str(i % 6), "timestamp": float(i), "track_id": None,
                                              "meta": None} for i in range(len(feats))]}
    index.save(path)
    return time.perf_counter() - start


def _batches(server: Served) -> tuple[float, float]:
    """(batches, queries in them) the service has run (its /metrics)."""
    import httpx

    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    value = {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln.startswith("reid_search_batch_queries_")}
    return value.get("reid_search_batch_queries_count", 0.0), value.get("reid_search_batch_queries_sum", 0.0)


def _peak_mb(server: Served) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def _closed_loop(url: str, queries: np.ndarray, clients: int, requests: int, rerank: bool,
                       add_share: float = 0.0, feats: np.ndarray | None = None) -> dict:
    """``clients`` tasks, each sending ``requests`` one-query requests in turn (or until SECONDS pass)."""
    import httpx

    latencies, add_latencies, failures = [], [], 0
    deadline = time.monotonic() + SECONDS
    bodies = [json.dumps({"features_b64": encode_feats(q[None]), "top_k": TOP_K, "rerank": rerank}) for q in queries]
    rng = random.Random(0)

    async def client(n: int, http) -> None:
        nonlocal failures
        for r in range(requests):
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            if add_share and rng.random() < add_share:
                row = feats[(n * requests + r) % len(feats)]
                reply = await http.post("/v1/items", json={"items": [{"id": f"add-{n}-{r}", "feature_b64":
                                                                      encode_feats(row[None])}]})
                add_latencies.append(time.perf_counter() - start)
            else:
                reply = await http.post("/v1/search", content=bodies[(n * 7919 + r) % len(bodies)],
                                        headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - start)
            failures += reply.status_code != 200

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post("/v1/search", content=bodies[0], headers={"content-type": "application/json"})  # warm
        start = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        seconds = time.perf_counter() - start
    return {"latencies": latencies, "add_latencies": add_latencies, "seconds": seconds, "failures": failures}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    p = np.percentile(np.array(values) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 2), "p95_ms": round(float(p[1]), 2), "p99_ms": round(float(p[2]), 2)}


def _load_row(server: Served, queries: np.ndarray, clients: int, requests: int, rerank: bool, n: int,
              add_share: float = 0.0, feats: np.ndarray | None = None) -> dict:
    before = _batches(server)
    result = asyncio.run(_closed_loop(server.url, queries, clients, requests, rerank, add_share, feats))
    count, total = (a - b for a, b in zip(_batches(server), before))
    searches = len(result["latencies"])
    row = {"what": "service" + (", 10 % adds" if add_share else ""), "gallery": n, "rerank": rerank,
           "clients": clients, "queries_per_s": round(searches / result["seconds"], 1),
           **_percentiles(result["latencies"]), "mean_batch": round(total / count, 2) if count else None,
           "requests": searches + len(result["add_latencies"]), "failures": result["failures"]}
    if add_share:
        row["adds_per_s"] = round(len(result["add_latencies"]) / result["seconds"], 2)
        row["add_p50_ms"] = _percentiles(result["add_latencies"]).get("p50_ms")
    return row


def _retention_row(server: Served, queries: np.ndarray, n: int) -> dict:
    """Delete the oldest 10 % by time while one client keeps searching."""
    import httpx

    async def run() -> tuple[float, dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            done = asyncio.Event()
            latencies = []

            async def searching() -> None:
                r = 0
                while not done.is_set() and r < 100_000:
                    body = {"features_b64": encode_feats(queries[r % len(queries)][None]), "top_k": TOP_K}
                    start = time.perf_counter()
                    await http.post("/v1/search", json=body)
                    latencies.append(time.perf_counter() - start)
                    r += 1

            task = asyncio.create_task(searching())
            start = time.perf_counter()
            reply = await http.request("DELETE", "/v1/items", json={"before": 0.1 * n})
            seconds = time.perf_counter() - start
            done.set()
            await task
            return seconds, {"deleted": reply.json().get("deleted"), **_percentiles(latencies)}

    seconds, info = asyncio.run(run())
    return {"what": "retention delete of the oldest 10 %", "gallery": n, "seconds": round(seconds, 2),
            **{("search_" + k if k.startswith("p") else k): v for k, v in info.items()}}


def _cli_rows(index: Path, queries: np.ndarray, folder: Path, n: int) -> list[dict]:
    """One ``reid search`` process for one query, plain and re-ranked (median of 3)."""
    npz = folder / "one.npz"
    np.savez(npz, query_feats=queries[:1], query_paths=np.array(["q.jpg"]))
    rows = []
    for rerank in (False, True):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([str(REID), "-q", "search", "--index", str(index), "--query-features", str(npz), "--out",
                            str(folder / "s.json"), "--top-k", str(TOP_K), "--per-query", f"results_dir={folder}"]
                           + (["--rerank"] if rerank else []), check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        rows.append({"what": "one reid search process per query", "gallery": n, "rerank": rerank,
                     "queries_per_s": round(1 / float(np.median(times)), 3),
                     "p50_ms": round(1000 * float(np.median(times)), 1)})
    return rows


def _library_rows(index_path: Path, queries: np.ndarray, rows: list[dict], n: int) -> list[dict]:
    """``Searcher.search`` in-process at the batch sizes the service formed, and the bare product."""
    import torch

    from reid_deploy.serve.searcher import RerankParams, Searcher

    searcher = Searcher.from_index(GalleryIndex.load(index_path), RerankParams())
    out = []
    for rerank in (False, True):
        formed = {1} | {max(1, round(r["mean_batch"])) for r in rows if r.get("what") == "service"
                        and r.get("rerank") == rerank and r.get("mean_batch") and r.get("gallery") == n}
        for batch in sorted(formed):
            searcher.search(queries[:batch], TOP_K, rerank)  # warm-up
            start, done = time.perf_counter(), 0
            while done < 200 and time.perf_counter() - start < SECONDS / 2:
                searcher.search(queries[done % 1000:done % 1000 + batch], TOP_K, rerank)
                done += batch
            seconds = time.perf_counter() - start
            out.append({"what": "library in-process (Searcher.search)", "gallery": n, "rerank": rerank,
                        "batch": batch, "queries_per_s": round(done / seconds, 1),
                        "ms_per_batch": round(1000 * seconds / (done / batch), 2)})
    gallery = torch.from_numpy(np.array(searcher.view.feats))
    for batch in (1, 32):
        x = torch.from_numpy(queries[:batch])
        torch.topk(x @ gallery.T, TOP_K, dim=1)
        start, done = time.perf_counter(), 0
        while done < 400 and time.perf_counter() - start < SECONDS / 4:
            torch.topk(torch.from_numpy(queries[done % 1000:done % 1000 + batch]) @ gallery.T, TOP_K, dim=1)
            done += batch
        seconds = time.perf_counter() - start
        out.append({"what": "bare torch product + top-k (the limit)", "gallery": n, "rerank": False,
                    "batch": batch, "queries_per_s": round(done / seconds, 1),
                    "ms_per_batch": round(1000 * seconds / (done / batch), 2)})
    return out


def _frames(feats: np.ndarray, count: int, kind: str) -> list[bytes]:
    """``count`` DeepStream messages (nv.Frame's JSON form), OBJECTS_PER_FRAME gallery features each."""
    out = []
    for n in range(count):
        rows = feats[(n * OBJECTS_PER_FRAME + np.arange(OBJECTS_PER_FRAME)) % len(feats)]
        objects = [{"id": str(j), "bbox": {"leftX": 1.0, "topY": 2.0, "rightX": 30.0, "bottomY": 90.0},
                    "embedding": {"vector": row.tolist()}} for j, row in enumerate(rows)]
        out.append(json.dumps({"version": "4.0", "id": str(n), "sensorId": f"{kind}-cam{n % 4}",
                               "timestamp": f"2026-12-08T11:{n // 3600 % 60:02d}:{n // 60 % 60:02d}.{n % 60:03d}Z",
                               "objects": objects}).encode())
    return out


def _ingest_row(server: Served, kind: str, port: int, queries: np.ndarray, feats: np.ndarray, count: int,
                n: int) -> dict:
    """Publish ``count`` messages to the broker, then time until the service holds their embeddings, with
    one client searching meanwhile (its latency beside the search-only p50 of the 1-client row)."""
    import httpx

    payloads = _frames(feats, count, kind)
    before = httpx.get(f"{server.url}/v1/index").json()["items"]
    expected = before + count * OBJECTS_PER_FRAME
    start = time.perf_counter()
    if kind == "redis":
        import redis

        client = redis.Redis("127.0.0.1", port)
        pipe = client.pipeline()
        for p in payloads:
            pipe.xadd("ds-events", {"metadata": p})
        pipe.execute()
    else:
        import paho.mqtt.client as mqtt

        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        for p in payloads:
            publisher.publish("deepstream/events", p, qos=1)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        while http.get("/v1/index").json()["items"] < expected and time.perf_counter() - start < 600:
            body = {"features_b64": encode_feats(queries[len(latencies) % len(queries)][None]), "top_k": TOP_K}
            t = time.perf_counter()
            http.post("/v1/search", json=body)
            latencies.append(time.perf_counter() - t)
        held = http.get("/v1/index").json()["items"]
    seconds = time.perf_counter() - start
    if kind == "mqtt":
        publisher.loop_stop()
        publisher.disconnect()
    return {"what": f"ingest from {kind} (DeepStream nv.Frame JSON)", "gallery": n,
            "embeddings": held - before, "seconds": round(seconds, 2),
            "embeddings_per_s": round((held - before) / seconds, 1),
            **{"search_" + k: v for k, v in _percentiles(latencies).items()}}


if __name__ == "__main__":
    sizes = tuple(int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--gallery="))
    for row in main(quick="--quick" in sys.argv, sizes=sizes or None):
        print(row)
