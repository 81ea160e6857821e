"""``SearchClient``: the Python client of ``reid serve`` (httpx). Features go as base64 float32 rows."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class ServiceError(Exception):
    """A reply other than 2xx: ``status`` and the service's one-line ``error``."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class SearchClient:
    """``SearchClient("http://127.0.0.1:8000", token=None)``; a context manager (closes its connections)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def search(self, features: np.ndarray | None = None, images: Sequence[str | Path | bytes] | None = None,
               top_k: int = 10, rerank: bool | None = None, **filters: Any) -> list[list[dict]]:
        """Each query's matches (dicts: rank, id, distance, camera, timestamp, track_id, meta). Queries: unit
        ``features`` [n, d] or ``images`` (files or JPEG/PNG bytes); ``filters``: cameras, exclude_cameras,
        since, until."""
        body: dict[str, Any] = {"top_k": top_k, **filters}
        if rerank is not None:
            body["rerank"] = rerank
        if features is not None:
            body["features_b64"] = _packed(np.atleast_2d(features))
        else:
            body["images"] = [_image_b64(i) for i in images]
        return [r["matches"] for r in self._call("POST", "/v1/search", body)["results"]]

    def add(self, ids: Sequence[str], features: np.ndarray | None = None,
            images: Sequence[str | Path | bytes] | None = None, **fields: Sequence[Any]) -> dict:
        """Add items ``ids`` with their features or images; ``fields``: lists of camera, timestamp, track_id,
        meta, one per item. Returns {"added", "skipped", "total"} once the items are durable."""
        items = []
        for n, item_id in enumerate(ids):
            item: dict[str, Any] = {"id": item_id, **{k: v[n] for k, v in fields.items() if v[n] is not None}}
            if features is not None:
                item["feature_b64"] = _packed(np.asarray(features[n])[None])
            else:
                item["image"] = _image_b64(images[n])
            items.append(item)
        return self._call("POST", "/v1/items", {"items": items})

    def delete(self, ids: Sequence[str] | None = None, before: float | str | None = None) -> dict:
        """Delete items by id and/or older than ``before``; returns {"deleted", "total"}."""
        body: dict[str, Any] = {}
        if ids is not None:
            body["ids"] = list(ids)
        if before is not None:
            body["before"] = before
        return self._call("DELETE", "/v1/items", body)

    def info(self) -> dict:
        return self._call("GET", "/v1/index")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        reply = self.http.request(method, path, json=body)
        if reply.status_code >= 300:
            try:
                message = reply.json().get("error", reply.text)
            except ValueError:
                message = reply.text
            raise ServiceError(reply.status_code, message)
        return reply.json()


def _packed(features: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(features, "<f4").tobytes()).decode()


def _image_b64(image: str | Path | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(data).decode()
