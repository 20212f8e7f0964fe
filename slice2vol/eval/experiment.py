"""The experiment config (``configs/experiments/*.yaml``): typed dataclasses, paths and loading.

One :class:`ExperimentConfig` describes a whole comparison: the cohort, how volumes are sliced, the
2D encoder entries (each with its aggregators), native-3D entries, the tasks and their options, the
splits and the statistics. Blocks named after a registered task that is not a field here (e.g.
``ssl_curve:``) are kept in ``task_params`` and parsed by that task itself, so adding a task never
touches this file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from slice2vol import config as _config
from slice2vol.config import ConfigError, apply_overrides
from slice2vol.data.io import VolumeConfig
from slice2vol.data.slicing import SliceConfig
from slice2vol.eval.anomaly import AnomalyConfig
from slice2vol.eval.knn import KNNConfig
from slice2vol.eval.linear import LinearConfig
from slice2vol.eval.segmentation import SegConfig
from slice2vol.eval.splits import SplitConfig


class IntegrationError(RuntimeError):
    """A pipeline stage whose library piece is missing or has another interface than expected."""


@dataclass
class CohortSection:
    """Attributes:
    manifest: CSV manifest (``${VAR:-default}`` expanded; relative to the repository root).
    synthetic: build the synthetic cohort with these ``make_cohort`` keywords instead (into ``<out>/cohort``).
    labels: label columns to evaluate (default: every label column).
    label_types: overrides of the inferred ``categorical``/``continuous`` types.
    max_subjects: use only the first N subjects.
    """

    manifest: str | None = None
    synthetic: dict | None = None
    labels: list[str] | None = None
    label_types: dict = field(default_factory=dict)
    max_subjects: int | None = None


@dataclass
class Encoder2DEntry:
    """A 2D encoder applied slice-wise. ``name`` labels it in tables; ``aggregators`` are
    ``slice2vol.aggregate`` methods, each giving one volume-embedding set ``<name>/<aggregator>``."""

    name: str
    key: str
    weights: str = "random"
    kwargs: dict = field(default_factory=dict)
    aggregators: list[str] = field(default_factory=lambda: ["mean"])
    aggregator_params: dict = field(default_factory=dict)
    batch_size: int = 32
    save_tokens: bool = False
    dtype: str = "float16"
    # optional: skip (with a warning) when the weights file is absent, so a config that uses
    # machine-specific weights still runs on a fresh machine
    optional: bool = False


@dataclass
class Encoder3DEntry:
    """A native-3D baseline: a checkpoint, or an SSL pretraining run (``ssl``: SSLConfig fields)."""

    name: str
    checkpoint: str | None = None
    ssl: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] = (64, 64, 64)


@dataclass
class ExperimentConfig:
    """A whole comparison (``configs/experiments/*.yaml``)."""

    name: str = "experiment"
    cohort: CohortSection = field(default_factory=CohortSection)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    encoders: list[Encoder2DEntry] = field(default_factory=list)
    encoders3d: list[Encoder3DEntry] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["knn", "linear", "segmentation", "anomaly"])
    splits: SplitConfig = field(default_factory=SplitConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    primary_k: int = 10
    linear: LinearConfig = field(default_factory=LinearConfig)
    segmentation: SegConfig = field(default_factory=SegConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    reference: str | None = None
    n_bootstrap: int = 1000
    n_permutations: int = 1000
    plots: list[str] = field(default_factory=lambda: ["umap", "tsne"])
    store_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    # blocks of tasks registered in slice2vol.eval.tasks that have no field above, by task name
    task_params: dict = field(default_factory=dict)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, base: Path | None = None) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment; a relative path is taken from ``base``."""

    def sub(m: re.Match) -> str:
        return os.environ.get(m.group(1)) or (m.group(2) or "")

    text = _ENV.sub(sub, str(value))
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute() and text not in ("random",) and not text.startswith("hub"):
        return str((base / path).resolve())
    return str(path)


def resolve_weights(weights: str, base: Path) -> str:
    """``random`` / ``hub[:tag]`` / ``package`` unchanged; anything else is a path taken from ``base``."""
    if weights in ("random", "package") or weights.startswith("hub"):
        return weights
    return expand(weights, base)


def repo_root_of(config_path: Path) -> Path:
    """The folder holding ``configs/`` above a config file (the repository), else the file's folder."""
    for parent in config_path.resolve().parents:
        if (parent / "configs").is_dir() and config_path.resolve().is_relative_to(parent / "configs"):
            return parent
    return config_path.resolve().parent


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, Path]:
    """Reads an experiment YAML (plus Hydra-style ``key.sub=value`` overrides); returns it and its base folder.

    Raises:
        ConfigError: unreadable file, unknown key or task, duplicate encoder names.
    """
    from slice2vol.eval.tasks import TASKS

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(data, overrides)
    fields = set(ExperimentConfig.__dataclass_fields__)
    params = dict(data.pop("task_params", None) or {})
    for key in [k for k in data if k not in fields and k in TASKS]:
        params[key] = data.pop(key) or {}
    data["task_params"] = params
    # through the module attribute, so a caller (or a test spy) sees every config this job builds
    cfg = _config.from_dict(ExperimentConfig, data, str(path))
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"{path}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    names = [e.name for e in cfg.encoders] + [e.name for e in cfg.encoders3d]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: encoder names must be unique, got {names}")
    return cfg, repo_root_of(path)
