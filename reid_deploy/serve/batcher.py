"""Dynamic batching of searches, as Triton's dynamic batcher does it: requests that arrive within
``max_delay`` of the first waiting one, up to ``max_batch`` queries, run as one batch (one model batch for
their images, one gallery pass per kind of search); at most ``max_queue`` queries wait, beyond that
``submit`` refuses (the caller answers 503). Batching never changes an answer: the searcher treats every
query on its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Overloaded(Exception):
    """More queries wait than the queue bound allows."""


@dataclass
class SearchRequest:
    """One request's queries (features, or crops to embed first) and how to search them (``key``: requests
    with equal keys share a gallery pass)."""

    key: Hashable
    feats: np.ndarray | None = None
    crops: Sequence[Any] | None = None
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.feats) if self.feats is not None else len(self.crops)


class Batcher:
    """``run(requests)`` is called from one worker thread with each batch; it sets every request's future."""

    def __init__(self, run: Callable[[list[SearchRequest]], None], max_batch: int, max_delay_s: float,
                 max_queue: int, observe_batch: Callable[[int], None] | None = None):
        self.run, self.max_batch, self.max_delay_s, self.max_queue = run, max_batch, max_delay_s, max_queue
        self.observe_batch = observe_batch
        self.waiting: list[tuple[float, SearchRequest]] = []
        self.queued = 0  # queries waiting
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="reid-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: SearchRequest) -> Future:
        with self._cond:
            if self._stopped:
                raise Overloaded("the service is shutting down")
            if self.queued + request.size > self.max_queue:
                raise Overloaded(f"{self.queued} queries are waiting (serve.max_queue is {self.max_queue})")
            self.waiting.append((time.monotonic(), request))
            self.queued += request.size
            self._cond.notify()
        return request.future

    def stop(self) -> None:
        """Run what waits, then end the worker."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[SearchRequest] | None:
        """The next batch: waits for a first request, then up to ``max_delay_s`` for more queries."""
        with self._cond:
            while not self.waiting and not self._stopped:
                self._cond.wait()
            if not self.waiting:
                return None
            deadline = self.waiting[0][0] + self.max_delay_s
            while self.queued < self.max_batch and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self.waiting and (not batch or size + self.waiting[0][1].size <= self.max_batch):
                request = self.waiting.pop(0)[1]
                batch.append(request)
                size += request.size
            self.queued -= size
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if self.observe_batch is not None:
                self.observe_batch(sum(r.size for r in batch))
            try:
                self.run(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the failure
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
