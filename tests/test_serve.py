"""``reid serve`` end to end: a real server process on a loopback port, real HTTP, the real CLI beside it."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from gallery_data import clustered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.processes import Served
from reid_deploy.client import SearchClient, ServiceError
from reid_deploy.retrieval.index import GalleryIndex

DIM = 32
GALLERY = 360


def market_name(i: int) -> str:
    return f"/g/{i // 4:04d}_c{i % 3 + 1}s1_{i:06d}_01.jpg"


def write_features(path: Path, gallery: np.ndarray, queries: np.ndarray) -> Path:
    np.savez(path, gallery_feats=gallery, gallery_paths=np.array([market_name(i) for i in range(len(gallery))]),
             query_feats=queries, query_paths=np.array([f"/q/{i}.jpg" for i in range(len(queries))]))
    return path


@pytest.fixture(scope="module")
def gallery_files(tmp_path_factory):
    """An index of GALLERY clustered items (Market names: cameras 1-3) built by the CLI, and 12 queries."""
    from reid_deploy.cli import main

    folder = tmp_path_factory.mktemp("serve")
    feats = clustered(GALLERY + 12, DIM, ids=40, seed=6)
    npz = write_features(folder / "f.npz", feats[12:], feats[:12])
    assert main(["index", "build", "--features", str(npz), "--out", str(folder / "g.index"),
                 f"results_dir={folder / 'results'}"]) == 0
    return folder, npz, feats[:12]


@pytest.fixture(scope="module")
def served(gallery_files):
    folder, _, _ = gallery_files
    server = Served(folder / "g.index", "serve.max_batch_delay_ms=20", f"results_dir={folder / 'results'}")
    yield server
    assert server.stop() == 0


def cli_search(folder: Path, npz: Path, rerank: bool, top_k: int) -> list[list[dict]]:
    from reid_deploy.cli import main

    out = folder / f"search-{rerank}-{top_k}.json"
    args = ["search", "--index", str(folder / "g.index"), "--query-features", str(npz), "--out", str(out),
            "--top-k", str(top_k), "--per-query", f"results_dir={folder / 'results'}"]
    assert main(args + (["--rerank"] if rerank else [])) == 0
    return [r["matches"] for r in json.loads(out.read_text())["results"]]


def same(service_rows: list[list[dict]], cli_rows: list[list[dict]]) -> None:
    for got, expected in zip(service_rows, cli_rows, strict=True):
        assert [m["id"] for m in got] == [m["path"] for m in expected]
        np.testing.assert_allclose([m["distance"] for m in got], [m["distance"] for m in expected], atol=1e-6)
        assert [m["rank"] for m in got] == list(range(1, len(got) + 1))


@pytest.mark.parametrize("rerank", [False, True])
def test_answers_equal_reid_search_per_query(gallery_files, served, rerank):
    folder, npz, queries = gallery_files
    with served.client() as client:
        alone = [client.search(queries[i], top_k=10, rerank=rerank)[0] for i in range(len(queries))]
        same(alone, cli_search(folder, npz, rerank, 10))
        full = cli_search(folder, npz, rerank, GALLERY)
        for filters, keep in (({"cameras": ["2"]}, lambda m: m["camid"] == 1),
                              ({"exclude_cameras": ["1", 3]}, lambda m: m["camid"] == 1)):
            got = [client.search(queries[i], top_k=6, rerank=rerank, **filters)[0] for i in range(len(queries))]
            same(got, [[m for m in row if keep(m)][:6] for row in full])
            assert all(m["camera"] == "2" for row in got for m in row)


def test_concurrent_searches_equal_solo_searches(gallery_files, served):
    _, _, queries = gallery_files
    requests = [(queries[i % 12], i % 2 == 1) for i in range(64)]
    with served.client() as client:
        solo = [client.search(q, top_k=8, rerank=r)[0] for q, r in requests]
        before = _batches(served)
        barrier = threading.Barrier(64)

        def one(n):
            barrier.wait()
            return client.search(requests[n][0], top_k=8, rerank=requests[n][1])[0]

        with ThreadPoolExecutor(64) as pool:
            together = list(pool.map(one, range(64)))
    assert together == solo
    count, queries_in = (a - b for a, b in zip(_batches(served), before))
    assert queries_in == 64 and count < 64  # some requests shared a batch


def _batches(server: Served) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("reid_search")}
    return value["reid_search_batch_queries_count"], value["reid_search_batch_queries_sum"]


def test_adds_and_deletes_then_equal_an_index_from_scratch(tmp_path):
    from reid_deploy.retrieval.graph import build_graph, with_weights
    from reid_deploy.retrieval.graph_rerank import rerank_topk_per_query

    feats = clustered(200, DIM, ids=20, seed=3)
    server = Served(tmp_path / "new.index", "--create", "--feat-dim", str(DIM), "index.graph_k=24",
                    f"results_dir={tmp_path}")
    with server.client() as client:
        times = [f"2026-12-0{1 + i // 50}T10:00:{i % 50:02d}Z" for i in range(200)]
        assert client.add([f"p{i}" for i in range(120)], feats[:120], camera=["a"] * 120,
                          timestamp=times[:120]) == {"added": 120, "skipped": [], "total": 120}
        assert client.add(["p5", "x1"], feats[[5, 120]], timestamp=[None, times[120]]) == \
            {"added": 1, "skipped": ["p5"], "total": 121}
        assert client.delete(ids=[f"p{i}" for i in range(0, 30, 2)]) == {"deleted": 15, "total": 106}
        client.add([f"p{i}" for i in range(121, 200)], feats[121:], timestamp=times[121:])
        assert client.delete(before="2026-12-02T00:00:00Z") == {"deleted": 35, "total": 150}
        remaining = ["x1"] + [f"p{i}" for i in range(121, 200)] + [f"p{i}" for i in range(50, 120)]
        keep = [120] + list(range(121, 200)) + list(range(50, 120))
        queries = clustered(5, DIM, ids=20, seed=8)
        got = [client.search(q, top_k=7, rerank=True)[0] for q in queries]
        assert client.info()["items"] == 150
    assert server.stop() == 0
    index = GalleryIndex.load(tmp_path / "new.index")
    assert sorted(index.paths) == sorted(remaining)
    order = [keep[remaining.index(p)] for p in index.paths]
    np.testing.assert_array_equal(np.asarray(index.feats), feats[order])
    fresh = with_weights(build_graph(feats[order], 24), feats[order], 20)
    np.testing.assert_array_equal(index.graph.indices, fresh.indices)
    np.testing.assert_allclose(index.graph.distances, fresh.distances, atol=1e-6)
    expected_i, expected_d = rerank_topk_per_query(queries, feats[order], fresh, 7, encoding=fresh.encoding)
    assert [[m["id"] for m in row] for row in got] == [[index.paths[i] for i in row] for row in expected_i]
    np.testing.assert_allclose([[m["distance"] for m in row] for row in got], expected_d, atol=1e-6)


def test_kill_9_during_adds_loses_no_acknowledged_item(tmp_path):
    feats = clustered(4000, DIM, ids=50, seed=5)
    args = ("--create", "--feat-dim", str(DIM), "index.graph_k=24", f"results_dir={tmp_path}")
    server = Served(tmp_path / "g.index", *args)
    sent, acknowledged, stop = set(), set(), threading.Event()
    lock = threading.Lock()

    def writer(t: int) -> None:
        with server.client() as client:
            for n in range(200):
                if stop.is_set():
                    return
                ids = [f"w{t}-{n}-{j}" for j in range(5)]
                rows = (t * 1000 + n * 5 + np.arange(5)) % len(feats)
                with lock:
                    sent.update(ids)
                try:
                    client.add(ids, feats[rows])
                except (httpx.TransportError, ServiceError):
                    return
                with lock:
                    acknowledged.update(ids)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    server.kill()
    assert len(acknowledged) >= 60
    again = Served(tmp_path / "g.index", *args)
    assert "log records replayed" in again.log()
    with again.client() as client:
        assert client.info()["items"] >= len(acknowledged)
    assert again.stop() == 0
    held = set(GalleryIndex.load(tmp_path / "g.index").paths)
    assert acknowledged <= held <= sent


def test_sigterm_drains_in_flight_requests_and_snapshots(tmp_path, gallery_files):
    folder, _, queries = gallery_files
    index = tmp_path / "g.index"
    index.write_bytes((folder / "g.index").read_bytes())
    server = Served(index, f"results_dir={tmp_path}")
    with server.client() as client:
        client.add(["late"], queries[:1])
        with ThreadPoolExecutor(16) as pool:
            pending = [pool.submit(client.search, queries[i % 12], top_k=10, rerank=True) for i in range(16)]
            time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
    assert all(len(a[0]) == 10 for a in answers)
    assert server.process.wait(60) == 0
    assert "snapshot of 361 items" in server.log()
    assert "late" in GalleryIndex.load(index).paths
    server.kill()


def test_token_bad_input_and_overload(tmp_path, gallery_files):
    folder, _, queries = gallery_files
    index = tmp_path / "g.index"
    index.write_bytes((folder / "g.index").read_bytes())
    server = Served(index, "serve.max_queue=2", "serve.max_body_mb=0.01", "serve.max_top_k=50",
                    f"results_dir={tmp_path}", env={"REID_SERVE_TOKEN": "s3cret"})
    url = f"{server.url}/v1/search"
    auth = {"Authorization": "Bearer s3cret"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = httpx.post(url, json={"features": queries[:1].tolist()}, headers=headers)
            assert reply.status_code == 401 and "bearer token" in reply.json()["error"]
        assert httpx.get(f"{server.url}/health/ready").status_code == 200  # health needs no token
        good = queries[:1].tolist()
        cases = [(b"{", 400, "not valid JSON"), ({"features": [[0.1] * 5]}, 400, "feature dimension is 32"),
                 ({"features": [[0.1] * DIM]}, 400, "not 1"), (b'{"features": [[NaN]]}', 400, "32"),
                 ({"features": good, "colour": 1}, 400, "colour"), ({"features": good, "top_k": 51}, 400, "top_k"),
                 ({"features": good, "top_k": 0}, 400, "top_k"), ({"images": ["aGVsbG8="]}, 400, "no model"),
                 ({"features": good, "since": "yesterday"}, 400, "RFC 3339"),
                 ({"features": [[0.0] * DIM] * 200}, 413, "max_body_mb"),
                 ({"features": queries[:3].tolist()}, 503, "overloaded")]
        for body, status, words in cases:
            reply = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body), headers=auth)
            assert reply.status_code == status and words in reply.json()["error"], (body, reply.text)
            assert "\n" not in reply.json()["error"]
        assert reply.headers["retry-after"] == "1"
        assert httpx.request("DELETE", f"{server.url}/v1/items", json={}, headers=auth).status_code == 400
        assert httpx.get(f"{server.url}/v1/nowhere", headers=auth).json() == {"error": "Not Found"}
        assert SearchClient(server.url, "s3cret").search(queries[0], top_k=3)[0][0]["rank"] == 1
    finally:
        assert server.stop() == 0


def test_index_add_refuses_a_served_index(cli, served, gallery_files):
    folder, npz, _ = gallery_files
    cli("index", "add", "--index", folder / "g.index", "--features", npz).user_error("POST /v1/items")


def test_search_by_image_equals_reid_search_of_the_files(tmp_path, cli, tiny_checkpoint, demo_dir):
    import base64

    images = demo_dir / "bounding_box_test"
    index = tmp_path / "g.index"
    cli("index", "build", "--model", tiny_checkpoint, "--images", images, "--out", index,
        f"results_dir={tmp_path}", "dataset.num_workers=0")
    out = tmp_path / "s.json"
    query = sorted((demo_dir / "query").glob("*.jpg"))[:3]
    for i, path in enumerate(query):  # one query per search: per-query answers of files searched alone
        assert cli("search", "--index", index, "--model", tiny_checkpoint, "--query", path, "--out",
                   out.with_suffix(f".{i}.json"), "--rerank", "--per-query", "--top-k", "5", f"results_dir={tmp_path}",
                   "dataset.num_workers=0").code == 0
    server = Served(index, "--model", str(tiny_checkpoint), f"results_dir={tmp_path}")
    try:
        with server.client() as client:
            for i, path in enumerate(query):
                expected = json.loads(out.with_suffix(f".{i}.json").read_text())["results"][0]["matches"]
                same(client.search(images=[path], top_k=5, rerank=True), [expected])
            reply = httpx.post(f"{server.url}/v1/search",
                               json={"images": [base64.b64encode(b"not an image").decode()]})
            assert reply.status_code == 400 and "images[0]: not a readable image" in reply.json()["error"]
            added = client.add(["crop"], images=[query[0]], camera=["9"])
            assert added["added"] == 1
            assert client.search(images=[query[0]], top_k=1, cameras=["9"])[0][0]["id"] == "crop"
    finally:
        assert server.stop() == 0


FIELDS = ["features", "features_b64", "images", "top_k", "rerank", "cameras", "exclude_cameras", "since", "until",
          "items", "ids", "before", "id", "feature", "image", "timestamp", "meta", "x"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, width=32)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(
                        max_size=4), inner, max_size=4), max_leaves=12)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON | st.lists(st.lists(st.floats(-1, 1), min_size=DIM,
                                                                                max_size=DIM), max_size=2),
                         max_size=4) | JSON


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, gallery_files):
    folder, _, _ = gallery_files
    index = tmp_path_factory.mktemp("fuzz") / "g.index"
    index.write_bytes((folder / "g.index").read_bytes())
    server = Served(index, f"results_dir={index.parent}")
    yield server
    assert server.stop() == 0


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, route=st.sampled_from([("POST", "/v1/search"), ("POST", "/v1/items"), ("DELETE", "/v1/items")]))
def test_any_request_body_gets_2xx_or_4xx_and_the_service_stays_healthy(fuzzed, body, route):
    method, path = route
    reply = httpx.request(method, f"{fuzzed.url}{path}", content=json.dumps(body, allow_nan=True), timeout=60)
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        message = reply.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message
    assert httpx.get(f"{fuzzed.url}/health/ready").status_code == 200
    assert not math.isnan(0.0)


def test_snapshot_policy_writes_the_index_while_serving(tmp_path):
    feats = clustered(6, DIM, ids=2, seed=1)
    server = Served(tmp_path / "g.index", "--create", "--feat-dim", str(DIM), "serve.snapshot_items=2",
                    f"results_dir={tmp_path}")
    try:
        with server.client() as client:
            client.add(["a", "b"], feats[:2])
            client.add(["c"], feats[2:3])  # the second logged write: a snapshot is due
            deadline = time.monotonic() + 30
            while client.info()["last_snapshot"] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            info = client.info()
        assert info["last_snapshot"] is not None and info["log_records"] == 0
        assert GalleryIndex.load(tmp_path / "g.index").paths == ["a", "b", "c"]  # while the service runs
    finally:
        assert server.stop() == 0


def test_an_index_that_cannot_be_served_is_one_line(cli, tmp_path):
    cli("serve", "--index", tmp_path / "missing.index", "--port", "0").user_error("index not found", "--create")
    (tmp_path / "bad.index").write_bytes(b"not an index")
    cli("serve", "--index", tmp_path / "bad.index", "--port", "0").user_error("not a reid-deploy index file")
    cli("serve", "--index", tmp_path / "g.index", "--host", "0.0.0.0").user_error("--insecure")
