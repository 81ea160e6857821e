"""The service's core without HTTP: the searcher under adds and deletes, the write-ahead log, the batcher."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from gallery_data import clustered

from reid_deploy.errors import DataError, ModelFileError
from reid_deploy.retrieval.graph import build_graph, with_weights
from reid_deploy.retrieval.graph_rerank import rerank_topk_per_query
from reid_deploy.retrieval.index import IndexParams
from reid_deploy.serve.batcher import Batcher, Overloaded, SearchRequest
from reid_deploy.serve.log import WriteAheadLog
from reid_deploy.serve.searcher import Filters, Item, Searcher


def items(ids, camera="a", t0=0.0):
    return [Item(str(i), camera, t0 + n) for n, i in enumerate(ids)]


@pytest.mark.parametrize("scores_per_block", [1 << 24, 300])  # 300: the recomputed rows in many chunks
def test_adds_and_deletes_equal_an_index_built_from_scratch(monkeypatch, scores_per_block):
    from reid_deploy.retrieval import knn

    monkeypatch.setattr(knn, "SCORES_PER_BLOCK", scores_per_block)
    feats = clustered(260, 16, ids=25, seed=2)
    searcher = Searcher(16, IndexParams(graph_k=24))
    searcher.add(feats[:100], items(range(100)))
    searcher.add(feats[100:180], items(range(100, 180), t0=100))
    assert searcher.delete([str(i) for i in range(0, 60, 3)] + ["unknown"]) == 20
    searcher.add(feats[180:260], items(range(180, 260), t0=180))
    assert searcher.delete(before=110) == 110 - 20  # times 0..109 that are left
    assert searcher.delete([str(i) for i in range(200, 230)]) == 30
    view = searcher.view
    remaining = [int(item.id) for item in view.items]
    assert remaining == [i for i in range(110, 260) if not 200 <= i < 230]
    kept = feats[remaining]
    np.testing.assert_array_equal(view.feats, kept)
    fresh = with_weights(build_graph(kept, 24), kept, 20)
    np.testing.assert_array_equal(view.graph.indices, fresh.indices)
    np.testing.assert_allclose(view.graph.distances, fresh.distances, atol=1e-6)
    np.testing.assert_allclose(view.graph.row_max, fresh.row_max, atol=1e-6)
    assert abs(view.graph.weights - fresh.weights).max() <= 1e-6
    np.testing.assert_array_equal(view.graph.sets, fresh.sets)
    queries = clustered(6, 16, ids=25, seed=9)
    got = searcher.search(queries, 8, rerank=True)
    expected_i, expected_d = rerank_topk_per_query(queries, kept, fresh, 8, encoding=fresh.encoding)
    assert [[int(m.item.id) for m in row] for row in got] == [[remaining[i] for i in row] for row in expected_i]
    np.testing.assert_allclose([[m.distance for m in row] for row in got], expected_d, atol=1e-6)


def test_repeated_ids_are_skipped_and_bad_features_refused():
    feats = clustered(10, 8, ids=3, seed=1)
    searcher = Searcher(8, IndexParams(graph_k=0))
    assert searcher.add(feats[:3], items(["a", "b", "a"])) == (["a", "b"], ["a"])
    assert searcher.add(feats[3:5], items(["b", "c"])) == (["c"], ["b"])
    with pytest.raises(DataError, match="length 2"):
        searcher.add(feats[:1] * 2, items(["d"]))
    with pytest.raises(DataError, match="NaN"):
        searcher.search(np.full((1, 8), np.nan), 3, False)
    with pytest.raises(DataError, match="length 8"):
        searcher.search(feats[:1, :4], 3, False)
    with pytest.raises(DataError, match="neighbour graph"):
        searcher.search(feats[:1], 3, True)


def test_filters_select_from_the_full_ranking():
    feats = clustered(120, 16, ids=10, seed=4)
    searcher = Searcher(16, IndexParams(graph_k=24))
    searcher.add(feats, [Item(str(i), "cam" + str(i % 3), float(i)) for i in range(120)])
    query = feats[:2]
    for rerank in (False, True):
        full = searcher.search(query, 120, rerank)
        for filters, allowed in ((Filters(cameras=frozenset({"cam1"})), lambda i: i % 3 == 1),
                                 (Filters(exclude_cameras=frozenset({"cam0", "cam2"})), lambda i: i % 3 == 1),
                                 (Filters(since=30, until=80.5), lambda i: 30 <= i <= 80)):
            got = searcher.search(query, 7, rerank, filters)
            for row_got, row_full in zip(got, full):
                expected = [m for m in row_full if allowed(int(m.item.id))][:7]
                assert [m.item.id for m in row_got] == [m.item.id for m in expected]
                np.testing.assert_allclose([m.distance for m in row_got], [m.distance for m in expected], atol=1e-6)
                assert [m.rank for m in row_got] == list(range(1, 8))


def test_log_replays_after_a_position_and_cuts_a_torn_tail(tmp_path):
    wal = WriteAheadLog(tmp_path / "log")
    assert wal.append([{"op": "add", "n": 1}, {"op": "add", "n": 2}]) == 2
    wal.rotate()
    assert wal.append([{"op": "delete", "n": 3}]) == 3
    wal.close()
    segment = wal.segments()[-1][1]
    segment.write_bytes(segment.read_bytes() + b"\x10\x00\x00\x00garbage")  # a write cut by a crash
    again = WriteAheadLog(tmp_path / "log")
    assert [r["n"] for r in again.replay(1)] == [2, 3]
    assert again.append([{"op": "add", "n": 4}]) == 4
    again.close()
    assert [r["seq"] for r in WriteAheadLog(tmp_path / "log").replay(0)] == [1, 2, 3, 4]
    again.drop_through(2)  # the first segment holds 1-2 only
    assert [r["seq"] for r in WriteAheadLog(tmp_path / "log").replay(0)] == [3, 4]
    first = WriteAheadLog(tmp_path / "log").segments()[0][1]
    first.write_bytes(b"\x00" + first.read_bytes()[1:])  # damage before the last segment: refused
    with pytest.raises(ModelFileError, match="damaged service log"):
        list(WriteAheadLog(tmp_path / "log").replay(0))


def test_batcher_groups_bounds_and_refuses_beyond_its_queue():
    seen, release = [], threading.Event()

    def run(batch):
        release.wait(5)
        seen.append([r.size for r in batch])
        for r in batch:
            r.future.set_result(r.size)

    batcher = Batcher(run, max_batch=4, max_delay_s=0.05, max_queue=6, observe_batch=None)
    first = batcher.submit(SearchRequest("k", np.zeros((1, 2))))
    time.sleep(0.1)  # the first batch (1 query) is running and blocked
    waiting = [batcher.submit(SearchRequest("k", np.zeros((n, 2)))) for n in (2, 2, 1)]
    with pytest.raises(Overloaded):
        batcher.submit(SearchRequest("k", np.zeros((2, 2))))  # 5 waiting + 2 > 6
    release.set()
    assert [f.result(5) for f in [first, *waiting]] == [1, 2, 2, 1]
    batcher.stop()
    assert seen == [[1], [2, 2], [1]]  # at most max_batch queries per batch, in arrival order
