"""The search service's core: a searcher, its write-ahead log, one writer thread, the search batcher,
snapshots and retention. Knows nothing of HTTP (``serve.app`` adapts it).

Writes: ``add`` / ``delete`` queue a record for the writer thread, which takes every record waiting (group
commit), appends them to the log with one fsync, applies them to the searcher in log order and publishes
the new view; only then is each caller's future resolved (acknowledged: durable and visible). Searches go
through the batcher and read the published view. Snapshots: after ``snapshot_items`` logged records or
``snapshot_seconds``, the writer rotates the log and a snapshot thread writes the index file atomically
with the view's log position, then drops the log segments it holds; start-up is that file + log replay.
The service holds ``<index>.serve.lock`` while it runs, so a second service or ``reid index add`` refuses.
"""

from __future__ import annotations

import base64
import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reid_deploy.console import log
from reid_deploy.errors import DataError, ReidError
from reid_deploy.retrieval.index import GalleryIndex, IndexInUse, IndexParams, index_lock, serve_lock_path
from reid_deploy.serve.batcher import Batcher, SearchRequest
from reid_deploy.serve.log import WriteAheadLog
from reid_deploy.serve.searcher import Filters, Item, RerankParams, Searcher, check_features

WRITE_GROUP = 4096  # most records applied as one group


@dataclass
class Settings:
    """What ``serve:`` in the spec sets (``from_spec``), plus the re-ranking parameters."""

    max_batch: int = 32
    max_batch_delay_ms: float = 2.0
    max_queue: int = 1024
    snapshot_items: int = 10000
    snapshot_seconds: float = 300.0
    retention_s: float | None = None
    rerank: RerankParams = field(default_factory=RerankParams)
    rerank_default: bool = False

    @classmethod
    def from_spec(cls, spec: Any) -> Settings:
        from reid_deploy.spec import parse_duration

        s, rr = spec.serve, spec.re_ranking
        return cls(s.max_batch, s.max_batch_delay_ms, s.max_queue, s.snapshot_items, s.snapshot_seconds,
                   parse_duration(s.retention) if s.retention else None, RerankParams(rr.k1, rr.k2, rr.lambda_value),
                   rr.re_ranking)


def log_folder(index_path: str | Path) -> Path:
    path = Path(index_path)
    return path.with_name(path.name + ".wal")


@dataclass
class _Write:
    op: str  # "add" or "delete"
    record: dict[str, Any]  # as logged (an add's features base64-encoded in it)
    future: Future
    feats: np.ndarray | None = None  # an add's features, as given (not decoded again from the record)


class Service:
    """Open with ``open`` (loads, replays, warms up); ``close`` drains, snapshots and releases the index."""

    def __init__(self, index_path: str | Path, settings: Settings, embed: Callable[[Sequence[Any]], np.ndarray]
                 | None = None, create_dim: int | None = None, create_params: IndexParams | None = None,
                 fingerprint: dict[str, Any] | None = None, ingest: Sequence[str] = ()):
        self.index_path, self.settings, self.embed = Path(index_path), settings, embed
        self.create_dim, self.create_params, self.create_fingerprint = create_dim, create_params, fingerprint
        self.observe_batch: Callable[[int], None] | None = None  # told each search batch's size
        self.ingest_urls = list(ingest)
        self.consumers: list = []  # ingest.consumers.Consumer, started once ready
        self.on_ingest_items: Callable[[str, int], None] = lambda url, n: None
        self.on_ingest_rejected: Callable[[str, str], None] = lambda url, reason: None
        self.searcher: Searcher | None = None
        self.log: WriteAheadLog | None = None
        self.ready = threading.Event()
        self.failure: str | None = None
        self.last_snapshot: float | None = None
        self.pending_records = 0  # logged records not yet in the index file
        self._first_pending: float | None = None  # when the oldest of them was logged (monotonic seconds)
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._embed_lock = threading.Lock()
        self._snapshotting = threading.Lock()
        self._log_lock = threading.Lock()
        self._lock_file = None
        self._writer: threading.Thread | None = None
        self.batcher: Batcher | None = None

    # ---- life cycle ----

    def open(self) -> None:
        """Take the index, load it (or create it), replay the log, warm up; then ``ready`` is set."""
        self._take_lock()
        start = time.perf_counter()
        if self.index_path.exists():
            index = GalleryIndex.load(self.index_path)
            if self.create_dim is not None:
                log.info("%s exists: serving it (--create makes a new index only where none is)", self.index_path)
        elif self.create_dim is not None:
            index = GalleryIndex(self.create_dim, self.create_fingerprint or {}, self.create_params or IndexParams())
            with index_lock(self.index_path):
                index.save(self.index_path)
            log.info("created the empty index %s (feature dimension %d)", self.index_path, self.create_dim)
        else:
            raise DataError(f"index not found: {self.index_path} (--create makes a new empty one)")
        self.searcher = Searcher.from_index(index, self.settings.rerank)
        self.log = WriteAheadLog(log_folder(self.index_path))
        snapshot_seq = self.searcher.view.seq
        replayed = self._replay()
        self.pending_records = self.log.last_seq - snapshot_seq
        self.batcher = Batcher(self._run_batch, self.settings.max_batch, self.settings.max_batch_delay_ms / 1000,
                               self.settings.max_queue, self.observe_batch)
        self._writer = threading.Thread(target=self._write_loop, name="reid-writer", daemon=True)
        self._writer.start()
        self._warm_up()
        log.info("serving %s: %d items (feature dimension %d, graph %s), %d log records replayed, ready in %.1f s",
                 self.index_path, len(self.searcher), self.searcher.feat_dim,
                 "none" if self.searcher.view.graph is None else self.searcher.view.graph.method, replayed,
                 time.perf_counter() - start)
        self.ready.set()
        self._start_ingest()

    def _start_ingest(self) -> None:
        from reid_deploy.serve.ingest.consumers import consumer_for

        for url in self.ingest_urls:
            consumer = consumer_for(url, self.searcher.feat_dim, self.add,
                                    lambda n, url=url: self.on_ingest_items(url, n),
                                    lambda reason, url=url: self.on_ingest_rejected(url, reason))
            consumer.start()
            self.consumers.append(consumer)
            log.info("ingesting DeepStream messages from %s", url)

    def close(self) -> None:
        """Stop ingesting, finish the searches and writes that wait, snapshot when the log holds anything,
        release the index."""
        for consumer in self.consumers:
            consumer.stop()
        if self.batcher is not None:
            self.batcher.stop()
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
        if self.searcher is not None and self.pending_records:
            self._snapshot(self.searcher.view)
        if self._lock_file is not None:
            self.log.close()
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _take_lock(self) -> None:
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(serve_lock_path(self.index_path), "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise IndexInUse(f"{self.index_path} is already served by another 'reid serve' (pid {pid})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_file = fh

    def _replay(self) -> int:
        """Apply the log records after the index file's position, consecutive adds as one group."""
        count, adds = 0, []
        for record in self.log.replay(self.searcher.view.seq):
            count += 1
            if record["op"] == "add":
                adds.append(record)
                continue
            self._apply_adds(adds)
            adds = []
            self.searcher.delete(record.get("ids", ()), record.get("before"), seq=record["seq"])
        self._apply_adds(adds)
        return count

    def _apply_adds(self, records: list[dict[str, Any]], feats: list[np.ndarray] | None = None
                    ) -> list[tuple[list[str], list[str]]]:
        """Add the items of consecutive add records as one group (``feats``: theirs, else decoded from the
        records); each record's (added ids, skipped ids)."""
        if not records:
            return []
        feats = np.concatenate(feats or [decode_feats(r["feats"], self.searcher.feat_dim) for r in records])
        items = [Item(**item) for r in records for item in r["items"]]
        added, _ = self.searcher.add(feats, items, seq=records[-1]["seq"])
        fresh, results = set(added), []
        for r in records:  # each record's share: its first-seen new ids
            mine = [item["id"] for item in r["items"]]
            got = [i for i in mine if i in fresh]
            fresh.difference_update(got)
            results.append((got, [i for i in mine if i not in set(got)]))
        return results

    def _warm_up(self) -> None:
        """One plain and one re-ranked search (torch's first products, the graph's pages)."""
        view = self.searcher.view
        if len(view.items):
            self.searcher.search(view.feats[:1], 10, False)
            if view.graph is not None:
                self.searcher.search(view.feats[:1], 10, True)

    # ---- writes ----

    def add(self, feats: np.ndarray, items: Sequence[Item]) -> Future:
        """Queue an add (features already checked here); the future gives (added ids, skipped ids, total)."""
        feats = check_features(feats, self.searcher.feat_dim)
        if len(feats) != len(items):
            raise DataError(f"{len(feats)} features for {len(items)} items")
        record = {"op": "add", "items": [vars(item) for item in items], "feats": encode_feats(feats)}
        return self._queue(_Write("add", record, Future(), feats))

    def delete(self, ids: Sequence[str] = (), before: float | None = None) -> Future:
        """Queue a delete of ``ids`` and/or of every item older than ``before``; the future gives (deleted,
        total)."""
        record: dict[str, Any] = {"op": "delete", "ids": list(ids)}
        if before is not None:
            record["before"] = before
        return self._queue(_Write("delete", record, Future()))

    def _queue(self, write: _Write) -> Future:
        if self.failure:
            raise ReidError(f"the service stopped taking writes: {self.failure}")
        self._writes.put(write)
        return write.future

    def _write_loop(self) -> None:
        """Commit the writes that wait, a group at a time, until ``close`` queues None; retention deletes join
        the groups on their schedule; a snapshot follows when one is due."""
        next_retention, stopping = time.monotonic(), False
        while not stopping:
            group, stopping = self._next_group()
            if self.settings.retention_s and time.monotonic() >= next_retention:
                next_retention = time.monotonic() + min(60.0, self.settings.retention_s / 10)
                group.append(_Write("delete", {"op": "delete", "ids": [], "retention": True,
                                               "before": time.time() - self.settings.retention_s}, Future()))
            if group:
                self._commit(group)
            self._maybe_snapshot()

    def _next_group(self) -> tuple[list[_Write], bool]:
        """(the writes waiting, at most WRITE_GROUP, after up to a second for a first one; whether ``close``
        asked to stop)."""
        try:
            write = self._writes.get(timeout=1.0)
        except queue.Empty:
            return [], False
        group = []
        while write is not None:
            group.append(write)
            if len(group) >= WRITE_GROUP:
                return group, False
            try:
                write = self._writes.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def _commit(self, group: list[_Write]) -> None:
        """Log the group (one fsync), apply it in order, publish, acknowledge."""
        try:
            with self._log_lock:
                last = self.log.append([w.record for w in group])
        except OSError as exc:  # a full or failing disk: nothing of the group is acknowledged
            self.failure = f"the log could not be written ({exc})"
            log.error("%s", self.failure)
            for w in group:
                w.future.set_exception(ReidError(self.failure))
            return
        first = last - len(group) + 1
        for n, w in enumerate(group):
            w.record["seq"] = first + n
        self.pending_records += len(group)
        run: list[_Write] = []
        for w in group + [None]:
            if w is not None and w.op == "add":
                run.append(w)
                continue
            for done, (added, skipped) in zip(run, self._apply_adds([r.record for r in run], [r.feats for r in run])):
                done.future.set_result((added, skipped, len(self.searcher)))
            run = []
            if w is not None:
                deleted = self.searcher.delete(w.record["ids"], w.record.get("before"), seq=w.record["seq"])
                if deleted and w.record.get("retention"):
                    log.info("retention: deleted %d items older than %s", deleted, w.record["before"])
                w.future.set_result((deleted, len(self.searcher)))

    # ---- snapshots ----

    def _maybe_snapshot(self) -> None:
        """Start a background snapshot when the policy says one is due (and none is running)."""
        if not self.pending_records:
            return
        now = time.monotonic()
        if self._first_pending is None:
            self._first_pending = now
        due = self.pending_records >= self.settings.snapshot_items or \
            now - self._first_pending >= self.settings.snapshot_seconds
        if due and self._snapshotting.acquire(blocking=False):
            view = self.searcher.view
            with self._log_lock:
                self.log.rotate()
            self._first_pending = None
            threading.Thread(target=self._background_snapshot, args=(view,), name="reid-snapshot",
                             daemon=True).start()

    def _background_snapshot(self, view) -> None:
        try:
            self._snapshot(view)
        finally:
            self._snapshotting.release()

    def _snapshot(self, view) -> None:
        """Write the index file of ``view`` atomically, then drop the log segments it holds."""
        start = time.perf_counter()
        index = self.searcher.to_index(view)
        with index_lock(self.index_path):
            index.save(self.index_path)
        with self._log_lock:
            if self._writer is None or not self._writer.is_alive():  # at shutdown: the last segment is closed
                self.log.rotate()
            self.log.drop_through(view.seq)
            self.pending_records = self.log.last_seq - view.seq
        self.last_snapshot = time.time()
        log.info("snapshot of %d items (log position %d) written to %s in %.1f s", len(view.items), view.seq,
                 self.index_path, time.perf_counter() - start)

    # ---- searches ----

    def search(self, top_k: int, rerank: bool, filters: Filters, feats: np.ndarray | None = None,
               crops: Sequence[Any] | None = None) -> Future:
        """Queue a search of features (checked here) or crops (embedded in the batch); the future gives one
        list of matches per query. Raises ``batcher.Overloaded`` when the queue is full."""
        if crops is not None and self.embed is None:
            raise DataError("this service has no model (start it with --model): search with features")
        if feats is not None:
            feats = check_features(feats, self.searcher.feat_dim)
        return self.batcher.submit(SearchRequest((top_k, rerank, filters), feats, crops))

    def _run_batch(self, requests: list[SearchRequest]) -> None:
        crops = [r for r in requests if r.feats is None]
        if crops:
            try:
                feats = self.embed_crops([c for r in crops for c in r.crops])
            except ReidError as exc:
                for r in crops:
                    r.future.set_exception(exc)
                requests = [r for r in requests if r.feats is not None]
            else:
                start = 0
                for r in crops:
                    r.feats, start = feats[start:start + len(r.crops)], start + len(r.crops)
        view = self.searcher.view
        groups: dict[Any, list[SearchRequest]] = {}
        for r in requests:
            groups.setdefault(r.key, []).append(r)
        for (top_k, rerank, filters), group in groups.items():
            try:
                matches = self.searcher.search(np.concatenate([r.feats for r in group]), top_k, rerank, filters,
                                               view)
            except ReidError as exc:
                for r in group:
                    r.future.set_exception(exc)
                continue
            start = 0
            for r in group:
                r.future.set_result(matches[start:start + len(r.feats)])
                start += len(r.feats)

    def embed_crops(self, crops: Sequence[Any]) -> np.ndarray:
        """Features of person crops by the service's model (one model batch; serialised)."""
        if self.embed is None:
            raise DataError("this service has no model (start it with --model): send features")
        with self._embed_lock:
            return self.embed(crops)

    def info(self) -> dict[str, Any]:
        view = self.searcher.view
        return {"items": len(view.items), "feat_dim": self.searcher.feat_dim, "model": self.searcher.fingerprint,
                "flip": self.searcher.flip, "graph_width": 0 if view.graph is None else view.graph.width,
                "graph": None if view.graph is None else view.graph.method,
                "rerank": vars(self.settings.rerank), "last_snapshot": self.last_snapshot,
                "log_records": self.pending_records, "log_seq": view.seq,
                "ingest": [c.status() for c in self.consumers]}


def encode_feats(feats: np.ndarray) -> str:
    """Base64 of little-endian float32 rows (the log's and the API's compact form)."""
    return base64.b64encode(np.ascontiguousarray(feats, "<f4").tobytes()).decode()


def decode_feats(text: str, feat_dim: int) -> np.ndarray:
    """float32 [n, feat_dim] from ``encode_feats``' form; DataError when it is not that."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise DataError("features_b64 is not valid base64") from None
    if len(raw) % (4 * feat_dim):
        raise DataError(f"features_b64 holds {len(raw)} bytes, not a whole number of {feat_dim}-dimensional "
                        f"float32 vectors")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(-1, feat_dim)


