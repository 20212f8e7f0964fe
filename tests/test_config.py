"""Hydra-style overrides: dotted keys, list indices, YAML values; clear errors on bad paths."""

from __future__ import annotations

from dataclasses import dataclass, field

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
