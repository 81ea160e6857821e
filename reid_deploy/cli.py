"""The ``reid`` command line. Each command only wires the spec and options to library calls.

Every user-facing failure is a ReidError; ``main`` turns it into one line on stderr and exit code 2
(``--debug`` shows the traceback instead). The ``reid`` script (``run``) then exits without the
interpreter's teardown. Heavy libraries (torch, onnxruntime, faiss) are imported
inside the commands so that ``reid --help`` and ``reid spec validate`` stay fast.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from reid_deploy import console
from reid_deploy.errors import EXIT_USER_ERROR, ReidError, shown
from reid_deploy.spec import Spec, load_spec

app = typer.Typer(help="Person re-identification: train, evaluate, export, build engines, index and search.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
spec_app = typer.Typer(help="Validate and show specs.", no_args_is_help=True)
index_app = typer.Typer(help="Build and extend a FAISS gallery index.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
app.add_typer(index_app, name="index")

_debug = False

SpecFile = Annotated[Path, typer.Option("-e", "--spec", help="Experiment spec (YAML).")]
OptionalSpecFile = Annotated[Optional[Path], typer.Option("-e", "--spec", help="Experiment spec (YAML); "
                                                          "defaults apply when omitted.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.num_epochs=5.",
                                                          show_default=False)]
KeyFile = Annotated[Optional[Path], typer.Option("--key-file", help="File holding the encryption passphrase "
                                                 "(else $REID_KEY, else the spec's encryption_key).")]
OptionalModelFile = Annotated[Optional[Path], typer.Option("--model", help="Model file: .pth, .onnx, .onnx.enc "
                                                          "or .engine.")]


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
            quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False
            ) -> None:
    global _debug
    _debug = debug
    console.setup(quiet=quiet, debug=debug)


def _spec(spec_file: Optional[Path], overrides: Optional[list[str]]) -> Spec:
    return load_spec(spec_file, overrides or [])


def _extraction_spec(spec_file: Optional[Path], overrides: Optional[list[str]]) -> Spec:
    """The spec of a command that extracts features; starts the loader workers' fork server (torch
    preloaded) right away, so that it imports while the model loads."""
    spec = _spec(spec_file, overrides)
    if spec.dataset.num_workers > 0:
        from reid_deploy.inference.loader import start_worker_server

        start_worker_server([__name__])
    return spec


@spec_app.command("validate")
def spec_validate(file: Annotated[Path, typer.Argument(help="Spec file.")], overrides: Overrides = None) -> None:
    """Check a spec: exit 0 when valid, else one line naming the key and exit 2."""
    _spec(file, overrides)
    typer.echo(f"OK: {file} is a valid spec")


@spec_app.command("show")
def spec_show(file: Annotated[Path, typer.Argument(help="Spec file.")], overrides: Overrides = None) -> None:
    """Print the resolved spec (defaults filled, overrides applied, key redacted)."""
    from reid_deploy.spec import to_yaml

    typer.echo(to_yaml(_spec(file, overrides)), nl=False)


@spec_app.command("reference")
def spec_reference() -> None:
    """Print every spec key with its type, default, allowed values and meaning (Markdown)."""
    from reid_deploy.spec import reference_table

    typer.echo(reference_table())


@app.command("demo-data")
def demo_data(out: Annotated[Path, typer.Argument(help="Output folder.")],
              ids: Annotated[int, typer.Option(min=2, help="Identities per split (train and test).")] = 60,
              cams: Annotated[int, typer.Option(min=2, max=9, help="Cameras.")] = 4,
              seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
              images_per_camera: Annotated[int, typer.Option(min=1, help="Most images per identity "
                                                             "and camera.")] = 5,
              distractors: Annotated[int, typer.Option(min=0, help="Gallery distractors (pid 0000).")] = 40,
              junk: Annotated[int, typer.Option(min=0, help="Gallery junk images (pid -1).")] = 20) -> None:
    """Write a synthetic Market-1501-layout dataset of drawn people."""
    from reid_deploy.data.synthetic import generate_demo_data

    layout = generate_demo_data(out, ids=ids, cams=cams, seed=seed, images_per_camera=images_per_camera,
                                distractors=distractors, junk=junk)
    typer.echo(f"wrote {len(layout.train)} train, {len(layout.query)} query and {len(layout.gallery)} "
               f"gallery images to {out}")


@app.command("dataset-summary")
def dataset_summary(spec_file: SpecFile, overrides: Overrides = None) -> None:
    """Read the spec's train/query/gallery folders and print images, identities and cameras."""
    from rich.console import Console
    from rich.table import Table

    from reid_deploy.data.market1501 import read_eval, read_train, summarize
    from reid_deploy.files import RunRecord

    spec = _spec(spec_file, overrides)
    train = read_train(spec.dataset.train_dataset_dir, spec.dataset.num_classes)
    query, gallery = read_eval(spec.dataset.query_dataset_dir, spec.dataset.test_dataset_dir)
    record = RunRecord(spec, "dataset_summary")
    table = Table(title="Dataset summary")
    for column in ("split", "images", "identities", "cameras", "folder"):
        table.add_column(column)
    for name, records, folder in (("train", train, spec.dataset.train_dataset_dir),
                                  ("query", query, spec.dataset.query_dataset_dir),
                                  ("gallery", gallery, spec.dataset.test_dataset_dir)):
        s = summarize(records)
        table.add_row(name, str(s.images), str(s.identities), str(s.cameras), str(folder))
        record.status(split=name, images=s.images, identities=s.identities, cameras=s.cameras)
    Console().print(table)


@app.command()
def train(spec_file: SpecFile, overrides: Overrides = None) -> None:
    """Train a ReID model as the spec says (checkpoints in <results_dir>/train); DDP under torchrun."""
    from reid_deploy.train.trainer import run_train

    result = run_train(_spec(spec_file, overrides))
    if result.checkpoint is not None:
        typer.echo(f"wrote {result.checkpoint}")


@app.command()
def evaluate(spec_file: OptionalSpecFile = None, overrides: Overrides = None,
             features: Annotated[Optional[Path], typer.Option("--features", help="Evaluate a features .npz "
                                                              "instead of a model.")] = None,
             key_file: KeyFile = None) -> None:
    """mAP / CMC (with re-ranking when re_ranking.re_ranking), plots into <results_dir>/evaluate."""
    from reid_deploy.evaluate.run import run_evaluate

    result = run_evaluate((_spec if features else _extraction_spec)(spec_file, overrides), features, key_file)
    typer.echo(f"wrote {result.metrics_file}, {result.cmc_plot} and {result.matches_plot}")


@app.command()
def inference(spec_file: SpecFile, overrides: Overrides = None, key_file: KeyFile = None) -> None:
    """Extract query and gallery features to inference.output_file (.npz or TAO .json)."""
    from reid_deploy.evaluate.run import run_inference

    typer.echo(f"wrote {run_inference(_extraction_spec(spec_file, overrides), key_file)}")


@app.command()
def export(spec_file: SpecFile, overrides: Overrides = None, key_file: KeyFile = None,
           no_encrypt: Annotated[bool, typer.Option("--no-encrypt", help="Write plain ONNX even when a key "
                                                    "is available.")] = False) -> None:
    """Export a checkpoint to ONNX (encrypted when a key is given), check parity, quantize to INT8."""
    from reid_deploy.deploy.onnx_export import run_export

    result = run_export(_spec(spec_file, overrides), key_file=key_file, no_encrypt=no_encrypt)
    for line in result.summary():
        typer.echo(line)


@app.command()
def decrypt(encrypted: Annotated[Path, typer.Argument(help="An .onnx.enc file.")],
            out: Annotated[Path, typer.Argument(help="Where to write the plain ONNX.")],
            key_file: KeyFile = None) -> None:
    """Decrypt an encrypted model to plain ONNX on disk (for operators who explicitly want that)."""
    from reid_deploy.crypto import decrypt_to_file
    from reid_deploy.errors import EncryptionError
    from reid_deploy.keys import resolve_key

    key = resolve_key(key_file)
    if not key:
        raise EncryptionError("no key: give it with --key-file or $REID_KEY")
    decrypt_to_file(encrypted, out, key)
    typer.echo(f"wrote plain ONNX {out} (mode 0600)")


@app.command("build-engine")
def build_engine(spec_file: SpecFile, overrides: Overrides = None, key_file: KeyFile = None) -> None:
    """Build a TensorRT engine (or an optimised ONNX Runtime model) from the exported ONNX."""
    from reid_deploy.deploy.trt_engine import run_build_engine

    path = run_build_engine(_spec(spec_file, overrides), key_file=key_file)
    typer.echo(f"wrote {path} (+ {path.name}.json)")


GalleryFeatures = Annotated[Optional[Path], typer.Option("--features", help="Features .npz (gallery_feats + "
                                                         "gallery_paths) instead of --model and --images.")]


@index_app.command("build")
def index_build(out: Annotated[Path, typer.Option("--out", help="Index file to write.")],
                model: OptionalModelFile = None,
                images: Annotated[Optional[Path], typer.Option("--images", help="Folder of gallery images.")] = None,
                features: GalleryFeatures = None,
                spec_file: OptionalSpecFile = None, overrides: Overrides = None,
                key_file: KeyFile = None) -> None:
    """Extract features of a folder of images (or read a features file) and write a FAISS index with the
    gallery's neighbour graph."""
    from reid_deploy.retrieval.commands import run_index_build

    index = run_index_build(_extraction_spec(spec_file, overrides), model, images, out, key_file, features)
    graph = f", {index.graph.method} neighbour graph (k={index.graph.k})" if index.graph else ""
    typer.echo(f"wrote {out}: {len(index)} images, feat_dim {index.feat_dim}, {index.params.index_type} index"
               f"{graph}")


@index_app.command("add")
def index_add(index: Annotated[Path, typer.Option("--index", help="Existing index file.")],
              model: OptionalModelFile = None,
              images: Annotated[Optional[Path], typer.Option("--images", help="Folder of images to add.")] = None,
              features: GalleryFeatures = None,
              spec_file: OptionalSpecFile = None, overrides: Overrides = None,
              key_file: KeyFile = None) -> None:
    """Add images (or a features file) to an existing index (the model must be the one that built it)."""
    from reid_deploy.retrieval.commands import run_index_add

    added, total = run_index_add(_extraction_spec(spec_file, overrides), index, model, images, key_file, features)
    typer.echo(f"added {added} images to {index}: {total} in all")


@app.command()
def search(index: Annotated[Path, typer.Option("--index", help="Index file.")],
           out: Annotated[Path, typer.Option("--out", help="Results JSON.")],
           model: OptionalModelFile = None,
           query: Annotated[Optional[Path], typer.Option("--query", help="Query image or folder.")] = None,
           query_features: Annotated[Optional[Path], typer.Option(
               "--query-features", help="Features .npz (query_feats + query_paths) instead of --model and "
                                        "--query.")] = None,
           top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Matches per query "
                                                        "(default: search.top_k).")] = None,
           rerank: Annotated[bool, typer.Option("--rerank", help="k-reciprocal re-ranking.")] = False,
           per_query: Annotated[bool, typer.Option("--per-query", help="Re-rank every query on its own, as 'reid "
                                                   "serve' does (default: the queries together, as evaluation "
                                                   "does).")] = False,
           montage: Annotated[Optional[Path], typer.Option("--montage", help="Also write a PNG of the "
                                                           "matches.")] = None,
           spec_file: OptionalSpecFile = None, overrides: Overrides = None, key_file: KeyFile = None) -> None:
    """Search the index for each query image (or query feature); write ranked matches as JSON."""
    from reid_deploy.retrieval.commands import run_search

    spec = _extraction_spec(spec_file, overrides)
    s = run_search(spec, index, model, query, out, top_k or spec.search.top_k, rerank or spec.search.rerank,
                   montage, key_file, query_features, per_query)
    typer.echo(f"wrote {out}: {s['queries']} queries x top {s['top_k']} of {s['gallery']}"
               f"{' (re-ranked)' if s['rerank'] else ''}; {s['queries_per_s']:.1f} queries/s end to end, "
               f"{s['search_queries_per_s']:.1f} queries/s search only")


@app.command()
def serve(index: Annotated[Path, typer.Option("--index", help="Index file to serve (with --create: made when "
                                                               "missing).")],
          model: OptionalModelFile = None,
          spec_file: OptionalSpecFile = None, overrides: Overrides = None, key_file: KeyFile = None,
          host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
          create: Annotated[bool, typer.Option("--create", help="Make a new empty index when none is there.")] = False,
          feat_dim: Annotated[Optional[int], typer.Option("--feat-dim", min=1, help="Feature dimension of a new "
                                                          "index without --model.")] = None,
          insecure: Annotated[bool, typer.Option("--insecure", help="Allow an address other than loopback "
                                                 "without a token.")] = False,
          ssl_certfile: Annotated[Optional[Path], typer.Option("--ssl-certfile", help="TLS certificate (PEM).")] = None,
          ssl_keyfile: Annotated[Optional[Path], typer.Option("--ssl-keyfile", help="TLS private key (PEM).")] = None,
          ingest: Annotated[Optional[list[str]], typer.Option("--ingest", help="Also add the objects of DeepStream "
                                                              "messages from redis://HOST:PORT/STREAM or "
                                                              "mqtt://HOST:PORT/TOPIC (repeatable).")] = None,
          ) -> None:
    """Serve gallery search over HTTP/JSON: warm, batched, exact re-ranking, live adds and deletes."""
    from reid_deploy.serve.command import run_serve

    run_serve(_spec(spec_file, overrides), index, model, host, port, create, feat_dim, insecure, key_file,
              ssl_certfile, ssl_keyfile, ingest or ())


# modules of the [cpu] / [gpu] extras: a command that needs one names the extra to install
OPTIONAL_MODULES = {name: "pip install 'reid-deploy[cpu]' (or 'reid-deploy[gpu]' on an NVIDIA GPU machine)"
                    for name in ("faiss", "onnxruntime")}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``reid`` script: run the app, map user errors to one line and exit code 2."""
    try:
        result = app(args=argv, prog_name="reid", standalone_mode=False)
    except ReidError as exc:
        if _debug:
            raise
        message = shown(" ".join(str(exc).split("\n")).strip()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as exc:
        if _debug or exc.name not in OPTIONAL_MODULES:
            raise
        print(f"error: {exc.name} is not installed: {OPTIONAL_MODULES[exc.name]}", file=sys.stderr)
        return EXIT_USER_ERROR
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except TyperException as exc:  # usage errors: missing or malformed options, unknown command
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {shown(' '.join(exc.format_message().split()))}{hint}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    return result if isinstance(result, int) else 0


def run() -> None:
    """The ``reid`` script: ``main``, then the exit handlers (logging, temporary folders, worker processes) and
    the streams' buffers, then the process ends without the interpreter's teardown, which frees every object
    of torch's thousand modules one by one (0.5-0.8 s after each command on 2 cores)."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe or a full disk: the exit code says so, as Python's own exit would
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    run()
