"""``reid serve``: open the model (optional) and the index, then run the HTTP service on uvicorn until
SIGTERM or Ctrl-C (which drain: no new connections, requests in flight finished, snapshot, exit 0)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reid_deploy.errors import DataError, ReidError, shown
from reid_deploy.retrieval.index import GalleryIndex, IndexParams, read_header
from reid_deploy.serve.service import Service, Settings

if TYPE_CHECKING:
    from reid_deploy.spec import Spec

TOKEN_VARIABLE = "REID_SERVE_TOKEN"
DRAIN_S = 30  # most seconds requests in flight get to finish after SIGTERM


def run_serve(spec: Spec, index: Path, model: Path | None, host: str, port: int, create: bool,
              feat_dim: int | None, insecure: bool, key_file: Path | None = None, ssl_certfile: Path | None = None,
              ssl_keyfile: Path | None = None, ingest: Sequence[str] = ()) -> None:
    import uvicorn

    from reid_deploy.serve.app import create_app
    from reid_deploy.serve.ingest.consumers import Source

    for url in ingest:
        Source.parse(url)  # a malformed URL: one line now, not after loading
    token = read_token(spec.serve.token_file)
    if not _loopback(host) and token is None and not insecure:
        raise ReidError(f"binding {host} without a token would let anyone on the network read and change the "
                        f"gallery: set serve.token_file or ${TOKEN_VARIABLE}, or pass --insecure")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ReidError("TLS needs both --ssl-certfile and --ssl-keyfile")
    embed, channels, fingerprint, dim = None, 3, {}, feat_dim
    if model is not None:
        from reid_deploy.retrieval.commands import _key, open_model

        extractor, fingerprint = open_model(model, _key(spec, key_file), spec)
        dim, channels = extractor.feat_dim, extractor.preprocess.channels
        if feat_dim is not None and feat_dim != dim:
            raise DataError(f"--feat-dim {feat_dim} does not match the model's features ({dim})")
        flip = _check_model(index, fingerprint, dim, spec.model.with_flip_feature)
        embed = lambda crops: extractor.embed(crops, flip)  # noqa: E731
    if create and not index.exists() and dim is None:
        raise ReidError("--create needs the feature dimension: give --model or --feat-dim")
    params = IndexParams.from_spec(spec.index, spec.re_ranking.k1)
    if params.index_type != "flat":
        raise DataError("reid serve keeps a flat index (exact search): set index.index_type=flat "
                        "(index.graph=hnsw keeps the neighbour graph of a large gallery quick to build)")
    service = Service(index, Settings.from_spec(spec), embed, dim if create else None, params, fingerprint,
                      ingest=ingest)
    servers = []  # uvicorn's server, stopped when the index cannot be opened
    announce = (f"reid serve on http{'s' if ssl_certfile else ''}://{host}:{port} (docs at /docs)"
                + ("" if token is None else "; every /v1 route needs the bearer token"))
    app = create_app(service, token, int(spec.serve.max_body_mb * 1e6), spec.serve.max_top_k, spec.serve.max_items,
                     channels, on_failure=lambda: setattr(servers[0], "should_exit", True), announce=announce)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=DRAIN_S, ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
    servers.append(_DrainingServer(config))
    servers[0].run()
    if service.failure:
        raise ReidError(f"cannot serve {shown(str(index))}: {service.failure}")


class _DrainingServer:
    """uvicorn's server, but a drained SIGTERM or Ctrl-C ends the command with exit code 0 (uvicorn raises the
    signal again after its shutdown, which would end the process by it)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        return Server(config)


def read_token(token_file: str) -> str | None:
    """The bearer token: serve.token_file's first line, else $REID_SERVE_TOKEN, else None."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ReidError(f"serve.token_file not found: {path}")
        token = path.read_text().strip()
        if not token:
            raise ReidError(f"serve.token_file {path} is empty")
        return token
    return os.environ.get(TOKEN_VARIABLE) or None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_model(index: Path, fingerprint: dict, feat_dim: int, spec_flip: bool) -> bool:
    """Whether features are flip-averaged: the index's setting when it exists (after checking that the model
    built it), else the spec's."""
    if not index.exists():
        return spec_flip
    header, _ = read_header(index)
    built = GalleryIndex(header["feat_dim"], header["fingerprint"])
    if built.fingerprint:
        built.check_model(fingerprint, feat_dim)
    elif feat_dim != built.feat_dim:
        raise DataError(f"the model makes {feat_dim}-dimensional features but {index} holds {built.feat_dim}")
    return bool(header["flip"])
