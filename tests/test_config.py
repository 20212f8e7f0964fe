"""Hydra-style overrides: dotted keys, list indices, YAML values; clear errors on bad paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slice2vol.config import ConfigError, apply_overrides, load_config


@dataclass
class _Entry:
    name: str = "a"
    weights: str = "random"


@dataclass
class _Cfg:
    entries: list[_Entry] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["knn"])
    n: int = 1


def test_list_index_override_reaches_the_dataclass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("entries:\n  - {name: a}\n  - {name: b}\n")
    cfg = load_config(_Cfg, path, ["entries.1.weights=hub", "tasks=[knn,linear]", "n=3"])
    assert [e.weights for e in cfg.entries] == ["random", "hub"]
    assert cfg.tasks == ["knn", "linear"] and cfg.n == 3


@pytest.mark.parametrize("override, message", [
    ("entries.5.weights=hub", "index 5 out of range"),
    ("entries.weights=hub", "is a list; use an index (e.g. entries.0.weights)"),
    ("n.x=1", "'n' is a int, not a mapping or list"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
    data = {"entries": [{"name": "a"}], "n": 1}
    with pytest.raises(ConfigError, match="^override") as err:
        apply_overrides(data, [override])
    assert message in str(err.value)


def test_a_key_given_twice_is_refused_and_merge_keys_still_work(tmp_path):
    """Fuzz round 12: PyYAML keeps the last of two equal keys, so a second `encoders:` block silently
    replaced the first."""
    from slice2vol.config import ConfigError, load_yaml, read_yaml

    twice = tmp_path / "twice.yaml"
    twice.write_text("encoders: [{name: a}]\nseed: 1\nencoders: [{name: b}]\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(twice)
    assert str(info.value).startswith(f"{twice}: cannot read config (key 'encoders' appears twice in one mapping "
                                      "(line 1 and line 3)")
    assert load_yaml("base: &b {x: 1, y: 1}\nz:\n  <<: *b\n  y: 2\n")["z"] == {"x": 1, "y": 2}
    assert load_yaml("a: {b: 1}\nc: {b: 2}\n") == {"a": {"b": 1}, "c": {"b": 2}}  # same key, other mappings


def test_a_malformed_yaml_file_is_one_line(tmp_path):
    """YAML parse errors span several lines (with a caret); the rule is one line naming the file."""
    from slice2vol.config import ConfigError, load_config
    from slice2vol.eval.experiment import load_experiment

    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [knn\nsplits: {n_folds: 3\n")
    for load in (lambda: load_experiment(bad), lambda: load_config(dict, bad)):
        with pytest.raises(ConfigError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{bad}: cannot read config (") and "\n" not in message and "line 2" in message


def test_an_override_that_brings_an_unknown_key_or_a_bad_value_is_named(tmp_path):
    """docs/cli.md promises errors naming the override; a typo was reported against the config file."""
    from slice2vol.config import ConfigError
    from slice2vol.eval.experiment import load_experiment

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"^override 'splits.n_fold=3': .*ci.yaml.splits: unknown key\(s\) "
                                          r"\['n_fold'\]"):
        load_experiment(repo / "configs/experiments/ci.yaml", ["splits.n_fold=3"])
    with pytest.raises(ConfigError, match=r"^override 'splits.n_folds=abc': .*splits.n_folds: expected int"):
        load_experiment(repo / "configs/experiments/ci.yaml", ["splits.n_folds=abc"])
    path = tmp_path / "c.yaml"
    path.write_text("n: 1\nentries: []\n")
    with pytest.raises(ConfigError, match=r"^override 'nn=2': .*c.yaml: unknown key\(s\) \['nn'\]"):
        load_config(_Cfg, path, ["nn=2"])
    path.write_text("n: 1\nbogus: 2\n")  # the file's own mistake is still the file's
    with pytest.raises(ConfigError, match=r"^\S*c.yaml: unknown key\(s\) \['bogus'\]"):
        load_config(_Cfg, path, ["n=3"])


@dataclass
class _Required:
    path: str
    name: str = "x"


def test_a_missing_required_key_and_a_boolean_number_are_named(tmp_path):
    """A list entry without its required key was a TypeError traceback ("__init__() missing 1 required
    positional argument"); ``n: true`` was taken as 1 (fuzz round 6)."""
    from slice2vol.config import from_dict
    from slice2vol.eval.experiment import load_experiment

    with pytest.raises(ConfigError, match=r"^c.yaml.entries\[0\]: missing key\(s\) \['path'\]$"):
        from_dict(_Required, {"name": "a"}, "c.yaml.entries[0]")
    path = tmp_path / "c.yaml"
    path.write_text("n: true\n")
    with pytest.raises(ConfigError, match=r"c.yaml.n: expected int, got True"):
        load_config(_Cfg, path)
    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"splits.n_folds: expected int, got True"):
        load_experiment(repo / "configs/experiments/ci.yaml", ["splits.n_folds=true"])
    # a features list entry without a name is named after its file, as a single block is
    cfg, _ = load_experiment(repo / "configs/experiments/ci.yaml", ["features=[{path: data/dlmuse.csv}]"])
    assert cfg.features[0].name == "dlmuse"


@dataclass
class _Params:
    lr: float = 0.1
    params: dict = field(default_factory=dict)
    name: str = "x"


@pytest.mark.parametrize("text, value", [
    ("1e6", 1e6), ("-2E-3", -2e-3), (".5e1", 5.0), ("1.0e5", 1e5), ("+3e+2", 300.0),
    ("10", 10), ("1.5", 1.5),  # YAML 1.1 numbers stay as they were
    ("1e", "1e"), ("e5", "e5"), ("1e6x", "1e6x"), ("'1e6'", "1e6"),  # not (only) a float: a string
])
def test_yaml_1_2_floats_are_floats_in_overrides(text, value):
    """PyYAML (YAML 1.1) read ``1e6`` (no dot, unsigned exponent) as the string '1e6', so an override
    ``params.p=1e6`` reached the aggregator as a string (fuzz round 8, H3)."""
    cfg = load_config(_Params, None, [f"params.p={text}"])
    assert cfg.params["p"] == value and type(cfg.params["p"]) is type(value)


def test_yaml_1_2_floats_are_floats_in_config_files(tmp_path):
    """``lr: 1e-3`` in a config file was the string '1e-3' (a ``dict`` or ``Any`` field kept it so)."""
    from slice2vol.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nparams: {lr: 1e-3, grid: [1e2, 5E-1, abc]}\n")
    assert read_yaml(path) == {"lr": 0.001, "params": {"lr": 0.001, "grid": [100.0, 0.5, "abc"]}}
    cfg = load_config(_Params, path)
    assert cfg.lr == 0.001 and cfg.params == {"lr": 0.001, "grid": [100.0, 0.5, "abc"]}
    assert type(cfg.params["lr"]) is float


def test_a_range_check_of_a_config_file_names_the_file_and_the_override(tmp_path):
    """``train.steps: -1`` in a file said only "train.steps must be ..." (which file?)."""
    from slice2vol.ssl import SSLConfig

    path = tmp_path / "ssl.yaml"
    path.write_text("method: simclr\ntrain: {steps: -1}\n")
    with pytest.raises(ConfigError, match=r"^\S*ssl.yaml: train.steps must be a whole number >= 0, got -1$"):
        load_config(SSLConfig, path)
    path.write_text("method: simclr\n")
    with pytest.raises(ConfigError, match=r"^\S*ssl.yaml: override 'train.steps=-3': train.steps must be"):
        load_config(SSLConfig, path, ["train.steps=-3"])
