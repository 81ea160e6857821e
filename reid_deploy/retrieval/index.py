"""The persistent gallery index: one file holding the FAISS index, the features, image paths, Market-1501
pid/camera where the names carry them, and the fingerprint of the model that made the features.

File layout: ``REIDIDX1`` magic, header length (uint64 little-endian), a JSON header, padding to 64 bytes,
the features (float32 [count, feat_dim], C order; memory-mapped on load, re-ranking reads them), the
gallery's neighbour graph when it has one (``graph.GalleryGraph``: int32 [count, width] neighbour lists,
float32 [count, width] squared distances, float32 [count] row maxima, the re-ranking weights as CSR
arrays: int64 [count + 1] row pointers, int32 [nnz] columns, float32 [nnz] values, and the packed
k-reciprocal sets, uint8 [count, sets_width]; memory-mapped), then the serialised FAISS index (none
for ``flat``: that one is searched exactly by blocked products of the features, ``knn.top_inner_products``).
Format 2 files (no graph) and format 3 files (no sets) still load; a re-ranked search builds what they
lack once and saves it.
Writes go to a temporary file that replaces the index in one step; writers hold an exclusive ``flock``
on ``<index>.lock`` around load-modify-save, so concurrent ``reid index add`` runs serialise and every
addition ends up in the index.

Distances are squared Euclidean distances of the L2-normalised features: ``2 - 2 cos``.
"""

from __future__ import annotations

import fcntl
import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from reid_deploy.console import log
from reid_deploy.data.market1501 import parse_name
from reid_deploy.errors import DataError, ModelFileError, missing_file
from reid_deploy.files import atomic_path
from reid_deploy.retrieval.graph import GalleryGraph, build_graph, extend_graph, with_weights
from reid_deploy.retrieval.knn import TRAIN_PER_LIST, ivf_lists, top_inner_products

MAGIC = b"REIDIDX1"
FORMAT_VERSION = 4  # 2: header holds a CRC-32 of the features and FAISS bytes; 3: the neighbour graph; 4: sets
READABLE_FORMATS = (2, 3, 4)
ALIGN = 64
REFINE = 4  # IVF-PQ: candidates re-scored exactly per match returned


def model_fingerprint(model: str | Path, key: str | None = None) -> dict[str, Any]:
    """The identity of a model file (``inference.identity.model_identity``): the hash of the weights it
    holds, its runtime and precision, name and file hash."""
    from reid_deploy.inference.identity import model_identity

    return model_identity(model, key)


def bytes_fingerprint(data: bytes, name: str) -> dict[str, Any]:
    """The identity of an ONNX model already in memory (the decrypted bytes of ``name``)."""
    from reid_deploy.inference.identity import onnx_identity

    return onnx_identity(data, name)


@dataclass
class IndexParams:
    """The FAISS index choice (from ``spec.index``), its search-time settings, and the neighbour graph's
    (``graph_k`` neighbours per item, 0: none; built ``graph``: exact, ivf or hnsw)."""

    index_type: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
    pq_m: int = 16
    ef_search: int = 128
    graph_k: int = 32
    graph: str = "exact"
    rerank_k1: int = 20  # k1 of the re-ranking weights kept with the graph (re_ranking.k1 at build)

    @classmethod
    def from_spec(cls, config: Any, rerank_k1: int = 20) -> IndexParams:
        """From ``spec.index`` (and ``spec.re_ranking.k1``)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__ if hasattr(config, name)},
                   rerank_k1=rerank_k1)


@dataclass
class GalleryIndex:
    """Gallery features with their FAISS index, paths, pids/camids and model fingerprint (``save``/``load``)."""

    feat_dim: int
    fingerprint: dict[str, str]
    params: IndexParams = field(default_factory=IndexParams)
    flip: bool = False  # features are flip-averaged (model.with_flip_feature at build); queries must match
    feats: np.ndarray = None  # float32 [count, feat_dim]
    paths: list[str] = field(default_factory=list)
    pids: list[int | None] = field(default_factory=list)
    camids: list[int | None] = field(default_factory=list)
    faiss_index: Any = None  # ivf / hnsw / ivfpq (a flat index has none)
    graph: GalleryGraph | None = None  # the gallery's neighbour graph (re-ranked search), when it has one
    service: dict[str, Any] | None = None  # what ``reid serve`` keeps beside (item metadata, its log position)

    def __post_init__(self) -> None:
        if self.feats is None:
            self.feats = np.zeros((0, self.feat_dim), np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def check_model(self, fingerprint: dict[str, Any], feat_dim: int | None = None) -> None:
        """ModelFileError unless the model holds the weights that built the index (any artefact of them:
        ``.pth``, ONNX, INT8, ONNX Runtime build, engine); one warning line when it runs them in another
        runtime or precision. Fingerprints of older indexes (a file hash only) match that file."""
        from reid_deploy.console import log
        from reid_deploy.inference.identity import INT8_COSINE_KEY, describe, identity_hash, same_weights

        built = self.fingerprint
        if not same_weights(built, fingerprint) or (feat_dim is not None and feat_dim != self.feat_dim):
            raise ModelFileError(
                f"the index was built with another model ({built.get('model_name')}, sha256 "
                f"{identity_hash(built)[:12]}, feat_dim {self.feat_dim}); {fingerprint['model_name']} "
                f"has sha256 {identity_hash(fingerprint)[:12]}: use that model or build a new index")
        if built.get("runtime") and fingerprint.get("runtime") and \
                (built["runtime"], built.get("precision")) != (fingerprint["runtime"], fingerprint.get("precision")):
            cosines = [f"{i['model_name']} {i[INT8_COSINE_KEY]:.4f}" for i in (fingerprint, built)
                       if INT8_COSINE_KEY in i]
            log.warning("%s holds the weights of %s, which built the index: their features may differ slightly"
                        "%s", describe(fingerprint), describe(built),
                        f" (min cosine to FP32 at export: {', '.join(cosines)})" if cosines else "")

    def add(self, feats: np.ndarray, paths: Sequence[str]) -> None:
        """Append features (L2-normalised float32) of ``paths``; trains IVF/PQ on the first addition. The
        first addition builds the neighbour graph (unless ``params.graph_k`` is 0); later ones extend it
        exactly (an index without a graph stays without one until ``ensure_graph``)."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.shape != (len(paths), self.feat_dim):
            raise ValueError(f"features {feats.shape} do not fit {len(paths)} paths x {self.feat_dim}")
        if not len(feats):
            return
        first = not len(self)
        if self.params.index_type != "flat":  # a flat index is searched by products of the stored features
            if self.faiss_index is None:
                self.faiss_index = self._new_faiss(feats)
            self.faiss_index.add(feats)
        self.feats = np.concatenate([self.feats, feats])
        if first and self.params.graph_k > 0:
            self.graph = self._build_graph(self.params.graph_k, self.params.graph)
        elif self.graph is not None:
            self.graph = with_weights(extend_graph(self.graph, self.feats), self.feats, self.params.rerank_k1)
        self.paths.extend(str(p) for p in paths)
        for p in paths:
            parsed = parse_name(Path(p).name)
            self.pids.append(parsed[0] if parsed else None)
            self.camids.append(parsed[1] if parsed else None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices int64, distances float32 = 2 - 2 cos), [n_query, min(k, len)], nearest first; -1 where
        an approximate index found fewer than k. IVF-PQ candidates (REFINE x k of them) are re-scored with
        the stored features, so distances are exact for every index type."""
        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kind = self.params.index_type
        if kind == "flat":  # exact, by products of the stored features (no FAISS copy of them)
            indices, scores = top_inner_products(queries, self.feats, k)
        elif kind == "hnsw":
            self.faiss_index.hnsw.efSearch = max(self.params.ef_search, k)
            scores, indices = self.faiss_index.search(queries, k)
        else:
            import faiss

            faiss.extract_index_ivf(self.faiss_index).nprobe = self.params.nprobe
            if kind == "ivf":
                scores, indices = self.faiss_index.search(queries, k)
            else:
                _, candidates = self.faiss_index.search(queries, min(REFINE * k, len(self)))
                exact = np.einsum("qd,qcd->qc", queries, self.feats[np.maximum(candidates, 0)])
                exact[candidates < 0] = -np.inf
                order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
                scores, indices = np.take_along_axis(exact, order, 1), np.take_along_axis(candidates, order, 1)
        return indices, np.maximum(2 - 2 * scores, 0).astype(np.float32)

    def has_graph_for(self, needed: int, k1: int) -> bool:
        """Whether the index holds a graph of at least ``needed`` neighbours with re-ranking weights and sets
        for ``k1``."""
        g = self.graph
        return g is not None and g.covers(needed) and g.weights_k1 == k1 and g.sets is not None

    def ensure_graph(self, needed: int, k: int, method: str, k1: int) -> bool:
        """Build the neighbour graph (``k`` neighbours, at least ``needed``, by ``method``) when the index
        has none or a narrower one, and its re-ranking weights when they are not for ``k1``; returns
        whether it did (then save the index)."""
        if self.has_graph_for(needed, k1):
            return False
        self.params.rerank_k1 = k1
        if self.graph is None or not self.graph.covers(needed):
            self.params.graph_k, self.params.graph = max(k, needed), method
            self.graph = self._build_graph(self.params.graph_k, method)
        else:
            self.graph = with_weights(self.graph, np.asarray(self.feats), k1)
        return True

    def _build_graph(self, k: int, method: str) -> GalleryGraph:
        p, feats = self.params, np.asarray(self.feats)
        graph = build_graph(feats, k, method, nlist=p.nlist, nprobe=p.nprobe, hnsw_m=p.hnsw_m, ef_search=p.ef_search)
        return with_weights(graph, feats, p.rerank_k1)

    def _new_faiss(self, feats: np.ndarray):
        import faiss

        p, d, n = self.params, self.feat_dim, len(feats)
        nlist = ivf_lists(p.nlist, n)
        if p.index_type == "ivfpq" and d % p.pq_m:
            raise DataError(f"index_type ivfpq needs feat_dim ({d}) divisible by index.pq_m ({p.pq_m})")
        if p.index_type == "ivfpq" and n < 256:
            raise DataError(f"index_type ivfpq needs at least 256 images to train its codebooks (got {n}); "
                            f"use index.index_type=flat or ivf")
        factory = {"ivf": f"IVF{nlist},Flat", "hnsw": f"HNSW{p.hnsw_m}"}.get(p.index_type)
        if p.index_type == "ivfpq":  # PQ codebooks of 2^nbits (4..8): smaller for small galleries
            factory = f"IVF{nlist},PQ{p.pq_m}x{int(np.clip(np.log2(n / 39), 4, 8))}"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:  # k-means on at most TRAIN_PER_LIST points per list (a random sample)
            sample = np.random.default_rng(0).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)
            index.train(feats[np.sort(sample)])
        return index

    def save(self, path: str | Path) -> None:
        """Write the index file atomically (temporary file, then one ``os.replace``)."""
        blob = b""
        if self.params.index_type != "flat":
            import faiss

            blob = faiss.serialize_index(self.faiss_index).tobytes()
        g = self.graph
        arrays = [np.ascontiguousarray(self.feats, np.float32)]
        if g is not None:
            arrays += [np.ascontiguousarray(g.indices, np.int32), np.ascontiguousarray(g.distances, np.float32),
                       np.ascontiguousarray(g.row_max, np.float32), np.ascontiguousarray(g.weights.indptr, np.int64),
                       np.ascontiguousarray(g.weights.indices, np.int32),
                       np.ascontiguousarray(g.weights.data, np.float32)]
            if g.sets is not None:
                arrays.append(np.ascontiguousarray(g.sets, np.uint8))
        crc = 0
        for data in [*arrays, blob]:
            crc = zlib.crc32(_raw(data), crc)
        graph = None if g is None else {"k": g.k, "width": g.width, "method": g.method, "agreement": g.agreement,
                                        "weights_k1": g.weights_k1, "weights_nnz": int(g.weights.nnz),
                                        "sets_width": 0 if g.sets is None else int(g.sets.shape[1])}
        header = {"format": FORMAT_VERSION, "feat_dim": self.feat_dim, "count": len(self),
                  "fingerprint": self.fingerprint, "params": vars(self.params), "flip": self.flip,
                  "graph": graph, "faiss_bytes": len(blob), "payload_crc32": crc,
                  "paths": self.paths, "pids": self.pids, "camids": self.camids,
                  **({"service": self.service} if self.service is not None else {})}
        raw = json.dumps(header).encode()
        start = _aligned(len(MAGIC) + 8 + len(raw))
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
            fh.write(b"\0" * (start - fh.tell()))
            for data in [*arrays, blob]:
                fh.write(_raw(data))

    @classmethod
    def load(cls, path: str | Path, quiet: bool = False) -> GalleryIndex:
        """Read an index file; ModelFileError when it is missing, not an index, or damaged. An older format
        is noted in the log (what a re-ranked search will add to it), unless ``quiet``."""
        path = Path(path)
        header, start = read_header(path)
        try:
            count, dim = int(header["count"]), int(header["feat_dim"])
            graph = header.get("graph")
            width, nnz = (int(graph["width"]), int(graph["weights_nnz"])) if graph else (0, 0)
            sets_width = int(graph.get("sets_width", 0)) if graph else 0
            graph_start = start + count * dim * 4
            weights_start = graph_start + count * (2 * width + 1) * 4
            sets_start = weights_start + (count + 1) * 8 + nnz * 8
            feat_end = sets_start + count * sets_width if graph else graph_start
            if path.stat().st_size != feat_end + int(header["faiss_bytes"]) or \
                    not len(header["paths"]) == len(header["pids"]) == len(header["camids"]) == count:
                raise ValueError("sizes do not match the header (truncated or damaged file)")
            if _crc32_from(path, start) != header["payload_crc32"]:
                raise ValueError("its features or FAISS data changed since it was written (checksum mismatch)")
            feats = np.memmap(path, np.float32, "r", start, (count, dim)) if count else \
                np.zeros((0, dim), np.float32)
            params = IndexParams(**header["params"])
            index = cls(dim, header["fingerprint"], params, bool(header["flip"]), feats, list(header["paths"]),
                        list(header["pids"]), list(header["camids"]), service=header.get("service"))
            if graph and count:
                indptr = np.memmap(path, np.int64, "r", weights_start, (count + 1,))
                columns = np.memmap(path, np.int32, "r", weights_start + (count + 1) * 8, (nnz,)) if nnz else \
                    np.zeros(0, np.int32)
                values = np.memmap(path, np.float32, "r", weights_start + (count + 1) * 8 + nnz * 4, (nnz,)) \
                    if nnz else np.zeros(0, np.float32)
                index.graph = GalleryGraph(
                    np.memmap(path, np.int32, "r", graph_start, (count, width)),
                    np.memmap(path, np.float32, "r", graph_start + count * width * 4, (count, width)),
                    np.memmap(path, np.float32, "r", graph_start + count * width * 8, (count,)),
                    int(graph["k"]), str(graph["method"]), graph["agreement"],
                    sp.csr_matrix((values, columns, indptr), shape=(count, count)), int(graph["weights_k1"]),
                    np.memmap(path, np.uint8, "r", sets_start, (count, sets_width)) if sets_width else None)
                if not sets_width and not quiet:
                    log.info("%s is a format-%d index without re-ranking sets: a re-ranked search (--rerank) "
                             "computes them once and saves them", path, header["format"])
            elif header["format"] < 3 and not quiet:
                log.info("%s is a format-%d index without a neighbour graph: a re-ranked search (--rerank) "
                         "builds it once and saves it", path, header["format"])
            if params.index_type != "flat":  # a flat index is searched by products of its features
                import faiss

                with open(path, "rb") as fh:
                    fh.seek(feat_end)
                    index.faiss_index = faiss.deserialize_index(np.frombuffer(fh.read(), np.uint8))
                if index.faiss_index.ntotal != count:
                    raise ValueError(f"the FAISS index holds {index.faiss_index.ntotal} vectors, the header {count}")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"damaged index file {path}: {exc}") from None
        return index


def read_header(path: str | Path) -> tuple[dict, int]:
    """(JSON header, offset of the features) of an index file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_file(path, "index file"))
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise ModelFileError(f"{path} is not a reid-deploy index file (build one with 'reid index build')")
        (size,) = struct.unpack("<Q", head[len(MAGIC):])
        try:
            header = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFileError(f"damaged index file {path}: unreadable header") from None
    version = header.get("format") if isinstance(header, dict) else None
    if version not in READABLE_FORMATS:
        raise ModelFileError(f"{path}: unsupported index format {version} (this version reads formats "
                             f"{' and '.join(map(str, READABLE_FORMATS))})")
    return header, _aligned(len(MAGIC) + 8 + size)


def _crc32_from(path: Path, offset: int) -> int:
    """CRC-32 of the file from ``offset`` to its end, read in blocks."""
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        for block in iter(lambda: fh.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _raw(data: np.ndarray | bytes) -> memoryview | bytes:
    """The bytes of an array without a copy (an empty one has none)."""
    return memoryview(data).cast("B") if len(data) else b""


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class IndexInUse(ModelFileError):
    """A running ``reid serve`` holds the index."""


def serve_lock_path(path: str | Path) -> Path:
    """``<index>.serve.lock``: held by the ``reid serve`` process that serves ``path`` (its pid inside)."""
    path = Path(path)
    return path.with_name(path.name + ".serve.lock")


def check_not_served(path: str | Path) -> None:
    """IndexInUse when a running ``reid serve`` holds the index ``path``."""
    lock = serve_lock_path(path)
    if not lock.exists():
        return
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise IndexInUse(f"{path} is served by 'reid serve' (pid {fh.read().strip() or '?'}): add items "
                             f"through its API (POST /v1/items) instead") from None
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def index_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (writers of the same index take turns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
