"""Property test: any mutation of the reference spec either validates or fails with one line naming the key."""

import contextlib
import io
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reid_deploy.cli import main
from reid_deploy.errors import SpecError
from reid_deploy.spec import load_spec

SEED = Path(__file__).parents[1] / "specs" / "market1501_swin_tiny.yaml"
REFERENCE = yaml.safe_load(SEED.read_text())


def _leaves(node, prefix=()):
    for name, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (name,))
        yield prefix + (name,)


PATHS = sorted(_leaves(REFERENCE))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(-5, 100), st.floats(-2, 2), st.text(max_size=3)),
                                   max_size=5),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2))


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


@st.composite
def mutated_specs(draw):
    """(YAML text, the dotted key the mutation touched)."""
    tree = yaml.safe_load(SEED.read_text())
    kind = draw(st.sampled_from(["value", "value", "value", "delete", "unknown", "truncate"]))
    path = draw(st.sampled_from(PATHS))
    if kind == "value":
        _set(tree, path, draw(VALUES))
    elif kind == "delete":
        _delete(tree, path)
    elif kind == "unknown":
        path = path[:-1] + (draw(st.sampled_from(["colour", "lr", "feat-dim", "x1"])),)
        _set(tree, path, draw(VALUES))
    text = yaml.safe_dump(tree, sort_keys=False)
    if kind == "truncate":
        text = text[:draw(st.integers(0, len(text)))] + draw(st.sampled_from(["", ":", "[", "  - ]", "\t{"]))
        path = ()
    return text, ".".join(path)


def _named(message: str, dotted: str) -> bool:
    if not dotted:  # truncated file: a YAML error or whichever key became invalid
        return "malformed YAML" in message or "spec error:" in message or "mapping" in message
    parts = dotted.split(".")
    return any(".".join(parts[:i]) in message for i in range(len(parts), 0, -1)) or parts[-1] in message


def _with_dataset(section: dict) -> str:
    tree = yaml.safe_load(SEED.read_text())
    tree["dataset"] = section
    return yaml.safe_dump(tree, sort_keys=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
@example((_with_dataset({"\n\n": 0}), "dataset"))  # drawn on an AMD EPYC machine: a key of two newlines
def test_mutated_spec_validates_or_names_the_key(case):
    text, dotted = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text)
        try:
            spec = load_spec(path)
        except SpecError as exc:
            message = str(exc)
            assert "\n" not in message
            assert _named(message, dotted), (dotted, message)
            return
    for value in (spec.model.feat_dim, spec.dataset.prob, spec.re_ranking.lambda_value, spec.train.optim.base_lr):
        assert math.isfinite(value)


@settings(max_examples=40, deadline=None)
@given(mutated_specs())
def test_cli_never_prints_a_traceback(case):
    text, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["spec", "validate", str(path)])
    assert code in (0, 2)
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")
