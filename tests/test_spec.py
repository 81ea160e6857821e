from pathlib import Path

import pytest
import yaml

from reid_deploy.errors import SpecError
from reid_deploy.spec import REDACTED, load_spec, reference_table, to_yaml

SPECS = Path(__file__).parents[1] / "specs"
SEED = SPECS / "market1501_swin_tiny.yaml"


def test_seed_spec_loads_verbatim():
    spec = load_spec(SEED)
    assert spec.model.backbone == "swin_tiny_patch4_window7_224"
    assert spec.model.feat_dim == 1024 and spec.model.stride_size == [16, 16]
    assert spec.dataset.num_classes == 751 and spec.dataset.sampler == "softmax_triplet"
    assert spec.re_ranking.k1 == 20 and spec.re_ranking.lambda_value == pytest.approx(0.3)
    assert spec.train.optim.lr_steps == [40, 70] and spec.train.optim.warmup_method == "cosine"
    assert spec.train.results_dir == "/path/to/experiment_results/train"  # ${results_dir} interpolation
    assert spec.encryption_key == "nvidia_tao"


@pytest.mark.parametrize("name", ["demo.yaml", "market1501_resnet50.yaml"])
def test_shipped_specs_load(name):
    assert load_spec(SPECS / name).model.feat_dim > 0


def test_overrides_apply():
    spec = load_spec(SEED, ["train.num_epochs=5", "model.backbone=resnet_50", "dataset.pixel_mean=[0.4,0.4,0.4]"])
    assert spec.train.num_epochs == 5 and spec.model.backbone == "resnet_50"
    assert spec.dataset.pixel_mean == [0.4, 0.4, 0.4]


def test_command_dir_defaults_under_results_dir():
    spec = load_spec(SEED)
    assert spec.command_dir("evaluate") == Path("/path/to/experiment_results/evaluate")
    assert spec.command_dir("train") == Path("/path/to/experiment_results/train")


@pytest.mark.parametrize("override, named", [
    ("model.backbone=vit_huge", "model.backbone"),
    ("model.feat_dim=abc", "model.feat_dim"),
    ("model.feat_dim=0", "model.feat_dim"),
    ("model.feat_dim=3.5", "model.feat_dim"),
    ("model.neck_feat=middle", "model.neck_feat"),
    ("model.unknown_key=1", "model.unknown_key"),
    ("nonsense=1", "nonsense"),
    ("dataset.prob=1.5", "dataset.prob"),
    ("dataset.batch_size=30", "dataset.batch_size"),
    ("dataset.pixel_std=[0.5,0.5]", "dataset.pixel_std"),
    ("dataset.pixel_std=[0.5,0.0,0.5]", "dataset.pixel_std"),
    ("train.optim.lr_steps=[70,40]", "train.optim.lr_steps"),
    ("train.optim.warmup_method=exp", "train.optim.warmup_method"),
    ("re_ranking.lambda_value=-0.1", "re_ranking.lambda_value"),
    ("model=null", "model"),
    ("model.stride_size=[16]", "model.stride_size"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(SpecError) as info:
        load_spec(SEED, [override])
    message = str(info.value)
    assert named in message and "\n" not in message


def test_unsupported_backbone_lists_the_supported_ones():
    with pytest.raises(SpecError, match="swin_tiny_patch4_window7_224"):
        load_spec(SEED, ["model.backbone=vit_huge"])


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: [unclosed\n")
    with pytest.raises(SpecError, match="malformed YAML.*line"):
        load_spec(bad)


@pytest.mark.parametrize("text", ["- a list\n", "just a string\n"])
def test_spec_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


def test_missing_file():
    with pytest.raises(SpecError, match="not found"):
        load_spec("/no/such/spec.yaml")


def test_key_is_redacted_in_yaml():
    text = to_yaml(load_spec(SEED))
    assert "nvidia_tao" not in text and REDACTED in text


def test_reference_table_lists_every_key():
    table = reference_table()
    for name in ("model.backbone", "dataset.num_instances", "re_ranking.k1", "train.optim.base_lr",
                 "train.clip_grad_norm", "build_engine.precision", "index.index_type"):
        assert f"`{name}`" in table


def test_validate_cli_exit_codes(cli):
    ok = cli("spec", "validate", SEED)
    assert ok.code == 0
    bad = cli("spec", "validate", SEED, "model.backbone=vit_huge")
    assert bad.code == 2
    assert "model.backbone" in bad.err and "resnet_50" in bad.err and "Traceback" not in bad.err
    assert len(bad.err.strip().splitlines()) == 1


def test_show_cli_resolves_and_redacts(cli):
    result = cli("spec", "show", SEED, "train.num_epochs=7")
    assert result.code == 0
    assert "num_epochs: 7" in result.out and "nvidia_tao" not in result.out


def test_readme_spec_reference_is_current():
    import importlib.util

    path = Path(__file__).parents[1] / "docs" / "update_readme.py"
    module_spec = importlib.util.spec_from_file_location("update_readme", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    text = module.README.read_text()
    assert module.render(text) == text, "README spec table is stale: run python docs/update_readme.py"


@pytest.mark.parametrize("key, escaped", [("\n\n", "\\n\\n"), ("\x1b[31mred", "\\x1b[31mred"), ("x\ry", "x\\ry"),
                                          ("a\u2028b", "a\\u2028b")])
def test_user_text_in_an_error_is_escaped_on_one_line(cli, tmp_path, key, escaped):
    tree = yaml.safe_load(SEED.read_text())
    tree["dataset"][key] = 1
    path = tmp_path / "spec\x1b[2Jname.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert f"dataset.{escaped}: unknown key '{escaped}'" in str(raised.value)
    line = cli("spec", "validate", path).user_error(f"unknown key '{escaped}'")
    assert line.isprintable()
    assert cli("spec", "validate", tmp_path / "missing\rname.yaml").user_error("missing\\rname.yaml").isprintable()


def test_log_records_escape_control_characters():
    import logging

    from reid_deploy.console import _OneLineFormatter

    record = logging.LogRecord("reid", logging.INFO, __file__, 1, "read %s", ("a\x1b[31m\rb\nc",), None)
    assert _OneLineFormatter("%(message)s").format(record) == "read a\\x1b[31m b c"  # \\r ends a line: a space
