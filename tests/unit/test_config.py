"""Config loading: both shipped files load; every kind of bad value is refused, naming the
setting's full path and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import PipelineConfig, load_config
from tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "config" / name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.training.fusions == ["early", "mid", "late"]
    assert cfg.memory.cap == 0.8 and cfg.memory.shrink_threshold == 0.7


def test_production_config_matches_the_plan() -> None:
    cfg = load_config(ROOT / "config" / "config.yaml")
    assert cfg.storage.uri == "s3://my-deepfake-bucket"
    assert (cfg.training.batch_size, cfg.training.learning_rate) == (16, 0.001)
    assert (cfg.storage.dataset_prefix, cfg.storage.outputs_prefix) == ("dataset/", "outputs/")


def test_every_key_in_config_yaml_is_commented() -> None:
    for line in (ROOT / "config" / "config.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and line.startswith("  "):
            assert "#" in line, f"config.yaml line has no comment: {line!r}"


def test_misspelt_section_is_refused_with_key_file_and_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "trainng:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trainng" in msg and str(path) in msg and "'training'" in msg


def test_misspelt_nested_key_names_full_path(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"training\.batch_sise: unknown setting.*'batch_size'"):
        load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("training:\n  batch_size: sixteen\n", r'training\.batch_size: .*integer.*got "sixteen"'),
        ("training:\n  batch_size: 0\n", r"training\.batch_size: .*greater than 0.*got 0"),
        ("training:\n  batch_size: 2.5\n", r"training\.batch_size: .*integer.*got 2\.5"),
        ("training:\n  learning_rate: -0.1\n", r"training\.learning_rate: .*greater than 0"),
        ("training:\n  fusions: [early, hybrid]\n", r"training\.fusions\.1: .*'early', 'mid'"),
        ("training:\n  fusions: []\n", r"training\.fusions: must name at least one"),
        ("memory:\n  cap: 1.5\n", r"memory\.cap: .*less than 1"),
        (
            "memory:\n  cap: 0.6\n",
            r"memory: .*shrink_threshold \(0\.7\) must be below cap \(0\.6\)",
        ),
        ("storage:\n  uri: http://bucket\n", r"storage\.uri: must be s3://"),
        ("storage:\n  outputs_prefix: ../x\n", r"storage\.outputs_prefix: must be a relative"),
        ("training:\n  mixed_precision: maybe\n", r"training\.mixed_precision: .*boolean"),
        ("training: 3\n", r"training: .*valid dictionary"),
    ],
)
def test_bad_values_name_the_setting_and_file(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  epochs: 5\n")
    cfg = load_config(path, ["training.epochs=3", "storage.uri=s3://other-bucket/pre"])
    assert cfg.training.epochs == 3
    assert cfg.storage.uri == "s3://other-bucket/pre"
    with pytest.raises(ConfigError, match=r"training\.epochs: .*got \"three\""):
        load_config(path, ["training.epochs=three"])
    with pytest.raises(
        ConfigError, match=r"trainig: unknown setting \(did you mean .training.\?\)"
    ):
        load_config(path, ["trainig.epochs=3"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(path, ["training.epochs"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_config_is_frozen() -> None:
    cfg = load_config(ROOT / "config" / "demo.yaml")
    with pytest.raises(Exception, match="frozen"):
        cfg.training.epochs = 9  # type: ignore[misc]


def test_no_credentials_in_shipped_configs() -> None:
    for name in ("config.yaml", "demo.yaml"):
        text = (ROOT / "config" / name).read_text().lower()
        for word in ("aws_access_key_id", "aws_secret_access_key", "secret_key", "password"):
            assert word not in text
