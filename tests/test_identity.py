"""One model, many artefacts: every artefact of one checkpoint carries its weights hash, and an index
built with one of them is searched with the others; other weights are refused; older indexes and ONNX
files exported before weights hashes keep working."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from reid_deploy.cli import main
from reid_deploy.crypto import read_model_bytes
from reid_deploy.errors import ModelFileError
from reid_deploy.inference.identity import (
    INT8_COSINE_KEY,
    WEIGHTS_KEY,
    model_identity,
    onnx_identity,
    weights_sha256,
)
from reid_deploy.retrieval.index import GalleryIndex, read_header

KEY = "identity-test-passphrase"
SPEC = Path(__file__).parents[1] / "specs" / "demo.yaml"
GALLERY_SIZE = 12


@dataclass
class Artefacts:
    root: Path
    key_file: Path
    checkpoint: Path
    onnx: Path  # model.onnx.enc, which built ``index``
    dynamic: Path  # model.int8.onnx.enc
    qdq: Path  # model.qdq.onnx.enc
    ort_build: Path  # build-engine target=onnxruntime, int8
    gallery: Path
    index: Path

    def opts(self, tmp: Path) -> list[str]:
        return [f"results_dir={tmp / 'results'}", "dataset.num_workers=0", "--key-file", str(self.key_file)]


def _main(*args: str | Path) -> None:
    code = main([str(a) for a in args])
    assert code == 0, args


@pytest.fixture(scope="module")
def artefacts(tiny_overrides, tiny_checkpoint, demo_dir, tmp_path_factory) -> Artefacts:
    """Export (both INT8 kinds), the ONNX Runtime INT8 build, and an index built with ``model.onnx.enc``."""
    root = tmp_path_factory.mktemp("identity")
    key_file = root / "key"
    key_file.write_text(KEY)
    results = root / "results"
    _main("-q", "export", "-e", SPEC, *tiny_overrides, f"results_dir={results}",
          f"export.checkpoint={tiny_checkpoint}", "export.int8=both", "export.cal_batches=2", "--key-file", key_file)
    onnx = results / "export" / "model.onnx.enc"
    _main("-q", "build-engine", "-e", SPEC, *tiny_overrides, f"results_dir={results}", f"build_engine.onnx_file={onnx}",
          "build_engine.target=onnxruntime", "build_engine.precision=int8", "--key-file", key_file)
    gallery = root / "gallery"
    gallery.mkdir()
    for image in sorted((demo_dir / "bounding_box_test").iterdir())[:GALLERY_SIZE]:
        (gallery / image.name).write_bytes(image.read_bytes())
    index = root / "gallery.index"
    _main("-q", "index", "build", "--model", onnx, "--images", gallery, "--out", index, f"results_dir={results}",
          "dataset.num_workers=0", "--key-file", key_file)
    return Artefacts(root, key_file, tiny_checkpoint, onnx, results / "export" / "model.int8.onnx.enc",
                     results / "export" / "model.qdq.onnx.enc",
                     results / "build_engine" / "engines" / "model.cpu.int8.onnx.enc", gallery, index)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # log lines may be wrapped on a narrow stderr


def test_every_artefact_names_the_checkpoints_weights(artefacts):
    expected = {artefacts.checkpoint: ("pytorch", "fp32"), artefacts.onnx: ("onnxruntime", "fp32"),
                artefacts.dynamic: ("onnxruntime", "int8-dynamic"), artefacts.qdq: ("onnxruntime", "int8-static"),
                artefacts.ort_build: ("onnxruntime", "int8-dynamic")}
    identities = {path: model_identity(path, KEY) for path in expected}
    weights = identities[artefacts.checkpoint][WEIGHTS_KEY]
    assert len(weights) == 64
    for path, identity in identities.items():
        assert identity[WEIGHTS_KEY] == weights, path
        assert (identity["runtime"], identity["precision"]) == expected[path]
        assert identity["model_name"] == path.name
    # file hashes: of the file, of the decrypted bytes for .enc (encrypting twice gives other files)
    sha = {path: identity["file_sha256"] for path, identity in identities.items()}
    assert sha[artefacts.checkpoint] == hashlib.sha256(artefacts.checkpoint.read_bytes()).hexdigest()
    assert sha[artefacts.onnx] == hashlib.sha256(read_model_bytes(artefacts.onnx, KEY)).hexdigest()
    assert len(set(sha.values())) == len(identities)
    # the INT8 models carry the cosine export measured; FP32 models and the CPU build (not measured) do not
    status = [json.loads(line) for line in (artefacts.root / "results" / "export" / "status.json").read_text()
              .splitlines()]
    int8 = next(s for s in status if s.get("event") == "export")["int8"]
    for kind, path in (("dynamic", artefacts.dynamic), ("static", artefacts.qdq)):
        assert identities[path][INT8_COSINE_KEY] == pytest.approx(int8[kind]["min_cosine"], abs=1e-6)
        assert 0.99 <= identities[path][INT8_COSINE_KEY] <= 1
    for path in (artefacts.checkpoint, artefacts.onnx, artefacts.ort_build):
        assert INT8_COSINE_KEY not in identities[path]


@pytest.mark.parametrize("artefact", ["checkpoint", "onnx", "qdq", "dynamic", "ort_build"])
def test_index_built_with_onnx_is_searched_with_every_artefact(cli, artefacts, artefact, tmp_path):
    model = getattr(artefacts, artefact)
    image = sorted(artefacts.gallery.iterdir())[5]
    out = tmp_path / "r.json"
    result = cli("search", "--index", artefacts.index, "--model", model, "--query", image, "--top-k", 3,
                 "--out", out, *artefacts.opts(tmp_path))
    assert result.code == 0, result.err
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["matches"][0]["path"] == str(image.resolve())
    err = _one_line(result.err)
    if artefact == "onnx":
        assert "holds the weights" not in err
        assert entry["matches"][0]["distance"] < 1e-4
        return
    identity = model_identity(model, KEY)
    assert f"{model.name} ({identity['runtime']} {identity['precision']}) holds the weights of model.onnx.enc " \
           f"(onnxruntime fp32), which built the index" in err
    if INT8_COSINE_KEY in identity:
        assert f"min cosine to FP32 at export: {model.name} {identity[INT8_COSINE_KEY]:.4f}" in err
    else:
        assert "min cosine" not in err


def test_index_add_accepts_another_artefact_of_the_weights(cli, artefacts, demo_dir, tmp_path):
    index = tmp_path / "copy.index"
    index.write_bytes(artefacts.index.read_bytes())
    result = cli("index", "add", "--index", index, "--model", artefacts.checkpoint, "--images", demo_dir / "query",
                 *artefacts.opts(tmp_path))
    assert result.code == 0, result.err
    grown = GalleryIndex.load(index)
    assert len(grown) == GALLERY_SIZE + len(list((demo_dir / "query").iterdir()))
    assert grown.fingerprint["model_name"] == "model.onnx.enc"  # the index keeps the identity that built it


def test_other_weights_are_refused(cli, artefacts, other_checkpoint, tmp_path):
    before = artefacts.index.read_bytes()
    for command in (("index", "add", "--index", artefacts.index, "--images", artefacts.gallery),
                    ("search", "--index", artefacts.index, "--query", artefacts.gallery, "--out", tmp_path / "r.json")):
        result = cli(*command, "--model", other_checkpoint, *artefacts.opts(tmp_path))
        line = result.user_error("the index was built with another model (model.onnx.enc", "other.pth",
                                 "use that model or build a new index")
        assert model_identity(artefacts.checkpoint)[WEIGHTS_KEY][:12] in line
    assert artefacts.index.read_bytes() == before


def test_an_index_written_in_the_old_header_form_keeps_working(cli, artefacts, other_checkpoint, tmp_path):
    """Before weights hashes, an index held ``{model_sha256, model_name}``: the file's sha256 (of the
    decrypted bytes for .enc). It still takes that model, and refuses others."""
    index = GalleryIndex.load(artefacts.index)
    old = tmp_path / "old.index"
    plain = read_model_bytes(artefacts.onnx, KEY)
    index.fingerprint = {"model_sha256": hashlib.sha256(plain).hexdigest(), "model_name": "model.onnx.enc"}
    index.save(old)
    assert read_header(old)[0]["fingerprint"] == index.fingerprint
    out = tmp_path / "r.json"
    result = cli("search", "--index", old, "--model", artefacts.onnx, "--query", artefacts.gallery, "--out", out,
                 *artefacts.opts(tmp_path))
    assert result.code == 0, result.err
    assert len(json.loads(out.read_text())["results"]) == GALLERY_SIZE
    result = cli("search", "--index", old, "--model", other_checkpoint, "--query", artefacts.gallery, "--out", out,
                 *artefacts.opts(tmp_path))
    result.user_error("another model", "use that model or build a new index")

    index.fingerprint = {"model_sha256": hashlib.sha256(artefacts.checkpoint.read_bytes()).hexdigest(),
                         "model_name": artefacts.checkpoint.name}  # an old index built with the .pth
    index.check_model(model_identity(artefacts.checkpoint))
    with pytest.raises(ModelFileError, match="another model"):
        index.check_model(model_identity(other_checkpoint))


def test_onnx_exported_before_weights_hashes_is_known_by_its_file_hash(artefacts, tmp_path):
    import onnx

    model = onnx.load_from_string(read_model_bytes(artefacts.onnx, KEY))
    props = {p.key: p.value for p in model.metadata_props if p.key != WEIGHTS_KEY}
    onnx.helper.set_model_props(model, props)
    legacy = tmp_path / "legacy.onnx"
    legacy.write_bytes(model.SerializeToString())
    identity = model_identity(legacy)
    assert identity[WEIGHTS_KEY] is None
    assert identity["file_sha256"] == hashlib.sha256(legacy.read_bytes()).hexdigest()
    old_index = GalleryIndex(32, {"model_sha256": identity["file_sha256"], "model_name": legacy.name})
    old_index.check_model(identity, 32)
    # an index that knows its weights cannot tell whether an unhashed file holds them: refused
    with pytest.raises(ModelFileError, match="another model"):
        GalleryIndex.load(artefacts.index).check_model(identity, 32)


def _fake_engine(folder: Path, name: str, precision: str, source: bytes) -> Path:
    """An engine file (any bytes: TensorRT is not installed here) and the sidecar build-engine writes."""
    import onnx

    engine = folder / name
    engine.write_bytes(b"not a real engine " + name.encode())
    props = {p.key: p.value for p in onnx.load_from_string(source).metadata_props}
    sidecar = {"target": "tensorrt", "precision": precision, "feat_dim": 32, "metadata": props,
               "source_sha256": hashlib.sha256(source).hexdigest()}
    engine.with_name(engine.name + ".json").write_text(json.dumps(sidecar))
    return engine


def test_engine_identity_comes_from_its_sidecar(artefacts, other_checkpoint, tmp_path, caplog):
    weights = model_identity(artefacts.checkpoint)[WEIGHTS_KEY]
    fp16 = _fake_engine(tmp_path, "model.gpu.fp16.engine", "fp16", read_model_bytes(artefacts.onnx, KEY))
    int8 = _fake_engine(tmp_path, "model.gpu.int8.engine", "int8", read_model_bytes(artefacts.qdq, KEY))
    identity = model_identity(fp16)
    assert (identity[WEIGHTS_KEY], identity["runtime"], identity["precision"]) == (weights, "tensorrt", "fp16")
    assert identity["file_sha256"] == hashlib.sha256(fp16.read_bytes()).hexdigest()
    int8_identity = model_identity(int8)
    assert (int8_identity["precision"], int8_identity[INT8_COSINE_KEY]) == \
        ("int8-static", model_identity(artefacts.qdq, KEY)[INT8_COSINE_KEY])

    index = GalleryIndex.load(artefacts.index)
    with caplog.at_level("WARNING", logger="reid"):
        index.check_model(identity, 32)
        index.check_model(int8_identity, 32)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0] == "model.gpu.fp16.engine (tensorrt fp16) holds the weights of model.onnx.enc (onnxruntime " \
                       "fp32), which built the index: their features may differ slightly"
    assert lines[1].startswith("model.gpu.int8.engine (tensorrt int8-static) holds the weights of model.onnx.enc")
    assert lines[1].endswith(f"(min cosine to FP32 at export: model.gpu.int8.engine "
                             f"{int8_identity[INT8_COSINE_KEY]:.4f})")

    # an engine built from an ONNX exported before weights hashes answers to that ONNX's hash
    import onnx

    model = onnx.load_from_string(read_model_bytes(artefacts.onnx, KEY))
    onnx.helper.set_model_props(model, {p.key: p.value for p in model.metadata_props if p.key != WEIGHTS_KEY})
    legacy_bytes = model.SerializeToString()
    legacy = model_identity(_fake_engine(tmp_path, "legacy.engine", "fp32", legacy_bytes))
    assert legacy[WEIGHTS_KEY] is None
    old_index = GalleryIndex(32, {"model_sha256": hashlib.sha256(legacy_bytes).hexdigest(), "model_name": "m.onnx"})
    old_index.check_model(legacy, 32)
    with pytest.raises(ModelFileError, match="another model"):
        old_index.check_model(model_identity(other_checkpoint), 32)

    (tmp_path / "model.gpu.fp16.engine.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="damaged engine sidecar"):
        model_identity(fp16)
    (tmp_path / "model.gpu.fp16.engine.json").unlink()
    with pytest.raises(ModelFileError, match="no sidecar"):
        model_identity(fp16)


def test_weights_hash_covers_names_dtypes_shapes_and_values():
    import torch

    weights = {"b": torch.arange(6, dtype=torch.float32), "a": torch.ones(2, 3), "n": torch.tensor(3)}
    digest = weights_sha256(weights)
    assert digest == weights_sha256(dict(reversed(list(weights.items()))))  # order of the dict does not matter
    changed = [{**weights, "b": weights["b"].reshape(2, 3)},  # same bytes, other shape
               {**weights, "n": torch.tensor(3, dtype=torch.int32)},  # other dtype
               {**weights, "a": torch.ones(2, 3).index_put_((torch.tensor([0]), torch.tensor([0])),
                                                            torch.tensor(1.0001))},  # one value
               {"c" if k == "b" else k: v for k, v in weights.items()}]  # a name
    assert len({digest, *(weights_sha256(w) for w in changed)}) == 1 + len(changed)
    assert weights_sha256({"t": torch.ones(4, 4).t()}) == weights_sha256({"t": torch.ones(4, 4).t().contiguous()})
    with pytest.raises(ModelFileError, match="not a tensor"):
        weights_sha256({"x": 3})


def test_identity_of_damaged_onnx_bytes_is_one_error():
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        onnx_identity(b"\x08\x07garbage", "broken.onnx")
