"""The HTTP/JSON face of the service (FastAPI): parse and check requests, authenticate, count; the work is
``serve.service``'s. Every reply to bad input is a 4xx with ``{"error": "<one line>"}``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from reid_deploy.console import log
from reid_deploy.errors import DataError, ReidError, shown
from reid_deploy.serve.batcher import Overloaded
from reid_deploy.serve.ingest.payloads import rfc3339_seconds
from reid_deploy.serve.searcher import Filters, Item, Match
from reid_deploy.serve.service import Service, decode_feats

API = "/v1"
PLAIN_DISTANCE = "squared Euclidean distance of the L2-normalised features (2 - 2 cos)"
MAX_ID_LENGTH = 512
MAX_META_BYTES = 4096
Timestamp = Union[float, str]
Camera = Union[str, int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrackBody(_Strict):
    camera: Camera
    track_id: Union[str, int]


class SearchBody(_Strict):
    """Queries as ``features`` (vectors), ``features_b64`` (base64 of little-endian float32 rows), ``images``
    (base64 JPEG/PNG crops) or ``track`` (the stored features of one camera's track, searched against the
    other cameras unless ``cameras`` / ``exclude_cameras`` say otherwise); exactly one of them."""

    features: Optional[list[list[float]]] = None
    features_b64: Optional[str] = None
    images: Optional[list[str]] = None
    track: Optional[TrackBody] = None
    top_k: int = Field(10, ge=1)
    rerank: Optional[bool] = None
    cameras: Optional[list[Camera]] = None
    exclude_cameras: Optional[list[Camera]] = None
    since: Optional[Timestamp] = None
    until: Optional[Timestamp] = None


class ItemBody(_Strict):
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    feature: Optional[list[float]] = None
    feature_b64: Optional[str] = None
    image: Optional[str] = None
    camera: Optional[Camera] = None
    timestamp: Optional[Timestamp] = None
    track_id: Optional[Union[str, int]] = None
    meta: Optional[dict[str, Any]] = None


class ItemsBody(_Strict):
    items: list[ItemBody]


class DeleteBody(_Strict):
    ids: Optional[list[str]] = None
    before: Optional[Timestamp] = None


class BadRequest(Exception):
    """A request the service cannot take: its HTTP status and one line."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def create_app(service: Service, token: str | None, max_body_bytes: int, max_top_k: int, max_items: int,
               channels: int = 3, on_failure: Any = None, announce: str | None = None) -> Any:
    """The FastAPI application over ``service`` (opened in a background thread at start-up, so that
    /health/live answers while it loads; closed at shutdown, after uvicorn has finished the requests in
    flight). ``on_failure()`` is called when the service cannot be opened; ``announce`` is logged once it is
    ready."""
    registry = CollectorRegistry()  # the app's own: nothing process-wide
    requests = Counter("reid_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("reid_request_seconds", "Request latency by route", ["route"], registry=registry,
                        buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
    batches = Histogram("reid_search_batch_queries", "Queries per search batch", registry=registry,
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    service.observe_batch = batches.observe
    Gauge("reid_search_queue_queries", "Queries waiting to be searched", registry=registry).set_function(
        lambda: service.batcher.queued if service.batcher else 0)
    Gauge("reid_index_items", "Items in the served gallery", registry=registry).set_function(
        lambda: len(service.searcher) if service.ready.is_set() else 0)
    Gauge("reid_log_records", "Logged writes not yet in the index file", registry=registry).set_function(
        lambda: service.pending_records)
    ingested = Counter("reid_ingest_items", "Items added from a broker", ["source"], registry=registry)
    rejected = Counter("reid_ingest_rejected", "Broker messages or objects that could not be used", ["source"],
                       registry=registry)
    service.on_ingest_items = lambda url, n: ingested.labels(url).inc(n)
    service.on_ingest_rejected = lambda url, reason: rejected.labels(url).inc()

    @asynccontextmanager
    async def lifespan(_: Any):
        opener = threading.Thread(target=_open, args=(service, on_failure, announce), name="reid-open", daemon=True)
        opener.start()
        yield
        await asyncio.to_thread(_close, service, opener)

    app = FastAPI(title="reid-deploy search service", version="1", lifespan=lifespan,
                  description="Exact gallery search with k-reciprocal re-ranking, live adds and deletes.")

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": shown(" ".join(message.split("\n")))}, status, headers=headers)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest):
        return error(exc.status, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error(400, f"{'.'.join(map(str, first['loc'])) or 'request'}: {first['msg']}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.error("unexpected failure: %s: %s", type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__}); the service keeps running")

    app.add_middleware(_Counted, requests=requests, latency=latency)

    async def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                             {"WWW-Authenticate": "Bearer"})

    def loaded() -> Service:
        if service.failure and not service.ready.is_set():
            raise BadRequest(503, f"the index could not be opened: {service.failure}")
        if not service.ready.is_set():
            raise BadRequest(503, "the index is still loading; try again shortly", {"Retry-After": "1"})
        return service

    async def body_of(request: Request, model: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise BadRequest(413, f"the body is over serve.max_body_mb ({max_body_bytes / 1e6:g} MB)")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise BadRequest(413, f"the body is over serve.max_body_mb ({max_body_bytes / 1e6:g} MB)")
        try:
            data = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise BadRequest(400, f"{where}: {first['msg']}" + (f" ({len(exc.errors())} problems in all)"
                                                                if len(exc.errors()) > 1 else "")) from None

    v1 = {"dependencies": [Depends(authorised)]}

    @app.post(f"{API}/search", **v1, openapi_extra=_body_schema(SearchBody))
    async def search(request: Request) -> JSONResponse:
        """Each query's top matches, in request order."""
        body: SearchBody = await body_of(request, SearchBody)
        svc = loaded()
        if body.top_k > max_top_k:
            raise BadRequest(400, f"top_k: at most {max_top_k} (serve.max_top_k)")
        rerank = svc.settings.rerank_default if body.rerank is None else body.rerank
        exclude = body.exclude_cameras
        if body.track is not None and body.cameras is None and exclude is None:
            exclude = [body.track.camera]  # the multi-camera question: where else did this person appear?
        filters = Filters(None if body.cameras is None else frozenset(map(str, body.cameras)),
                          frozenset(map(str, exclude or ())),
                          None if body.since is None else epoch_seconds(body.since, "since"),
                          None if body.until is None else epoch_seconds(body.until, "until"))
        given = [name for name in ("features", "features_b64", "images", "track") if getattr(body, name) is not None]
        if len(given) != 1:
            raise BadRequest(400, "give exactly one of features, features_b64, images or track")
        feats, crops = None, None
        if body.track is not None:
            try:
                feats = svc.searcher.track_feature(str(body.track.camera), str(body.track.track_id))
            except ReidError as exc:
                raise BadRequest(404, str(exc)) from None
        elif body.images is not None:
            _count_within(len(body.images), max_items, "images")
            _needs_model(svc)
            crops = await asyncio.to_thread(lambda: [decode_image(b, f"images[{i}]", channels)
                                                     for i, b in enumerate(body.images)])
        else:
            feats = _features(body.features, body.features_b64, svc.searcher.feat_dim, "features")
            _count_within(len(feats), max_items, "queries")
        try:
            future = svc.search(body.top_k, rerank, filters, feats=feats, crops=crops)
        except Overloaded as exc:
            raise BadRequest(503, f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from None
        except ReidError as exc:
            raise BadRequest(400, str(exc)) from None
        try:
            matches = await asyncio.wrap_future(future)
        except ReidError as exc:
            raise BadRequest(400, str(exc)) from None
        r = svc.settings.rerank
        distance = (f"k-reciprocal re-ranked distance (Zhong et al. 2017; k1={r.k1}, k2={r.k2}, "
                    f"lambda={r.lambda_value}), each query on its own" if rerank else PLAIN_DISTANCE)
        return JSONResponse({"results": [{"matches": [match_json(m) for m in row]} for row in matches],
                             "distance": distance, "rerank": rerank})  # a plain dict: no encoder pass

    @app.post(f"{API}/items", **v1, openapi_extra=_body_schema(ItemsBody))
    async def add_items(request: Request) -> dict:
        """Add items (acknowledged once in the fsynced log and searchable); ids already held are skipped."""
        body: ItemsBody = await body_of(request, ItemsBody)
        svc = loaded()
        _count_within(len(body.items), max_items, "items")
        items, feats = await asyncio.to_thread(_items_and_features, svc, body.items, channels)
        try:
            added, skipped, total = await asyncio.wrap_future(svc.add(feats, items))
        except ReidError as exc:
            raise BadRequest(400 if isinstance(exc, DataError) else 503, str(exc)) from None
        return {"added": len(added), "skipped": skipped, "total": total}

    @app.delete(f"{API}/items", **v1, openapi_extra=_body_schema(DeleteBody))
    async def delete_items(request: Request) -> dict:
        """Delete items by id, and/or every item older than ``before``."""
        body: DeleteBody = await body_of(request, DeleteBody)
        svc = loaded()
        if body.ids is None and body.before is None:
            raise BadRequest(400, "give ids, before, or both")
        if body.ids is not None:
            _count_within(len(body.ids), max_items, "ids")
        before = None if body.before is None else epoch_seconds(body.before, "before")
        try:
            deleted, total = await asyncio.wrap_future(svc.delete(body.ids or (), before))
        except ReidError as exc:
            raise BadRequest(503, str(exc)) from None
        return {"deleted": deleted, "total": total}

    @app.get(f"{API}/index", **v1)
    async def index_info() -> dict:
        """Size, feature dimension, model identity, graph width, last snapshot, log length."""
        return loaded().info()

    @app.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/health/ready")
    async def ready():
        if service.ready.is_set():
            return {"ready": True, "items": len(service.searcher), "ingest": [c.status() for c in service.consumers]}
        return error(503, service.failure or "loading")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Counted:
    """Pure ASGI middleware: counts every HTTP request by route and status and times it (Starlette's
    BaseHTTPMiddleware costs about a millisecond a request)."""

    def __init__(self, app: Any, requests: Any, latency: Any):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(route, str(status[0])).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)


def _open(service: Service, on_failure: Any, announce: str | None) -> None:
    try:
        service.open()
        if announce:
            log.info("%s", announce)
    except ReidError as exc:
        service.failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported by /health/ready and at exit, not lost in a thread
        service.failure = f"{type(exc).__name__}: {exc}"
    if service.failure and on_failure is not None:
        on_failure()


def _close(service: Service, opener: threading.Thread) -> None:
    opener.join()
    if service.ready.is_set():
        service.close()


def _body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _needs_model(service: Service) -> None:
    if service.embed is None:
        raise BadRequest(400, "this service has no model (start it with --model): send features instead of images")


def _count_within(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise BadRequest(400, f"{count} {what} in one request; at most {limit} (serve.max_items)")
    if count == 0:
        raise BadRequest(400, f"no {what} given")


def _features(vectors: list[list[float]] | None, packed: str | None, feat_dim: int, what: str) -> Any:
    import numpy as np

    try:
        if packed is not None:
            return decode_feats(packed, feat_dim)
        if any(len(v) != feat_dim for v in vectors):
            wrong = next(i for i, v in enumerate(vectors) if len(v) != feat_dim)
            raise DataError(f"{what}[{wrong}] has {len(vectors[wrong])} values; the index's feature dimension "
                            f"is {feat_dim}")
        return np.asarray(vectors, np.float32).reshape(-1, feat_dim)
    except DataError as exc:
        raise BadRequest(400, str(exc)) from None


def _items_and_features(service: Service, bodies: list[ItemBody], channels: int) -> tuple[list[Item], Any]:
    """The items of an add request and their features (given, or embedded from their images in one batch)."""
    import numpy as np

    dim = service.searcher.feat_dim
    feats = np.zeros((len(bodies), dim), np.float32)
    crops, crop_rows = [], []
    for n, b in enumerate(bodies):
        given = [x for x in (b.feature, b.feature_b64, b.image) if x is not None]
        if len(given) != 1:
            raise BadRequest(400, f"items[{n}]: give exactly one of feature, feature_b64 or image")
        if b.image is not None:
            _needs_model(service)
            crops.append(decode_image(b.image, f"items[{n}].image", channels))
            crop_rows.append(n)
        else:
            row = _features(None if b.feature is None else [b.feature], b.feature_b64, dim, f"items[{n}].feature")
            if len(row) != 1:
                raise BadRequest(400, f"items[{n}].feature_b64: one vector per item, got {len(row)}")
            feats[n] = row[0]
        if b.meta is not None and len(json.dumps(b.meta)) > MAX_META_BYTES:
            raise BadRequest(400, f"items[{n}].meta: at most {MAX_META_BYTES} bytes of JSON")
    if crops:
        try:
            feats[crop_rows] = service.embed_crops(crops)
        except ReidError as exc:
            raise BadRequest(400, str(exc)) from None
    items = [Item(b.id, None if b.camera is None else str(b.camera),
                  None if b.timestamp is None else epoch_seconds(b.timestamp, f"items[{n}].timestamp"),
                  None if b.track_id is None else str(b.track_id), b.meta) for n, b in enumerate(bodies)]
    return items, feats


def decode_image(text: str, where: str, channels: int) -> Any:
    """A PIL image from base64 JPEG/PNG bytes, converted as image files are (``data.transforms.open_image``)."""
    from reid_deploy.data.transforms import open_image

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{where}: not valid base64") from None
    try:
        return open_image(io.BytesIO(raw), channels)
    except DataError:
        raise BadRequest(400, f"{where}: not a readable image ({len(raw)} bytes; JPEG or PNG expected)") from None


def epoch_seconds(value: float | str, where: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (with its zone, as DeepStream writes them) or a number."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        try:
            seconds = rfc3339_seconds(value.strip())
        except ValueError as exc:
            raise BadRequest(400, f"{where}: {exc} (e.g. 2026-12-08T10:15:00Z, or epoch seconds)") from None
    if not math.isfinite(seconds):
        raise BadRequest(400, f"{where}: not a finite time")
    return seconds


def match_json(match: Match) -> dict[str, Any]:
    item = match.item
    return {"rank": match.rank, "id": item.id, "distance": round(match.distance, 6) + 0.0, "camera": item.camera,
            "timestamp": item.timestamp, "track_id": item.track_id, "meta": item.meta}



