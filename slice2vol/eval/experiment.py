"""The experiment config (``configs/experiments/*.yaml``): typed dataclasses, paths and loading.

One :class:`ExperimentConfig` describes a whole comparison: the cohort, how volumes are sliced, the
2D encoder entries (each with its aggregators), native-3D entries, the tasks and their options, the
splits and the statistics. Blocks named after a registered task that is not a field here (e.g.
``ssl_curve:``) are kept in ``task_params`` and parsed by that task itself, so adding a task never
touches this file.
"""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from slice2vol import config as _config
from slice2vol.config import ConfigError, apply_overrides, check_whole
from slice2vol.data.io import VolumeConfig
from slice2vol.data.slicing import SliceConfig
from slice2vol.eval.anomaly import AnomalyConfig
from slice2vol.eval.knn import KNNConfig
from slice2vol.eval.linear import LinearConfig
from slice2vol.eval.segmentation import SegConfig
from slice2vol.eval.splits import MAX_SEED, SplitConfig


class IntegrationError(RuntimeError):
    """A pipeline stage whose library piece is missing or has another interface than expected."""


@dataclass
class CohortSection:
    """Attributes:
    manifest: CSV manifest (``${VAR:-default}`` expanded; relative to the repository root).
    synthetic: build the synthetic cohort with these ``make_cohort`` keywords instead (into ``<out>/cohort``).
    labels: label columns to evaluate (default: every label column).
    label_types: overrides of the inferred ``categorical``/``continuous`` types.
    max_subjects: use only the first N subjects (N >= 1; None: all).
    """

    manifest: str | None = None
    synthetic: dict | None = None
    labels: list[str] | None = None
    label_types: dict = field(default_factory=dict)
    max_subjects: int | None = None

    def __post_init__(self) -> None:
        # -3 was taken as "all but the last 3" (a negative slice) and 0 as "all", both silently
        value = self.max_subjects
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ValueError(f"cohort.max_subjects must be a whole number >= 1 or null (all subjects), got {value!r}")


@dataclass
class Encoder2DEntry:
    """A 2D encoder applied slice-wise. ``name`` labels it in tables; ``aggregators`` are
    ``slice2vol.aggregate`` methods, each giving one volume-embedding set ``<name>/<aggregator>``.

    Trainable aggregators (``mil``, ``transformer``, ``head3d``, ``fusion`` with a trainable base or
    plane attention) are fitted inside each training fold (supervised on the evaluated label unless
    their ``objective`` is ``contrastive``). ``aggregator_params.<method>.train_ids`` fits once on
    those subjects instead; the leakage guard refuses it when they are test subjects.
    ``store``: use an existing slice-feature store (written by ``slice2vol cache``) instead of
    caching with ``key``/``weights``.
    """

    name: str
    key: str = ""
    store: str | None = None
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
    """A native-3D encoder: a registered network (``key``, see :mod:`slice2vol.encoders3d`), an SSL
    checkpoint, or an SSL pretraining run (``ssl``: SSLConfig fields).

    Attributes:
        key, weights, kwargs: ``build_encoder3d(key, weights, **kwargs)``; ``sliding_window``: options of
            ``embed_cohort3d`` (None: whole volume).
        checkpoint: an SSL run's ``last`` checkpoint.
        ssl: pretrain this SSL config (label-free) before embedding.
        pretrain_on: subjects of that pretraining: ``cohort`` (every subject, test subjects' images
            included — disclosed in the report), ``training_folds`` (refitted on each training fold:
            no test image is ever seen) or ``manifest`` (``pretrain_manifest``, another cohort).
        input_size: grid the SSL encoder embeds whole volumes at.
        optional: skip a ``key`` entry whose weights cannot be found here instead of failing the run.
    """

    name: str
    key: str | None = None
    weights: str = "random"
    kwargs: dict = field(default_factory=dict)
    sliding_window: dict | None = None
    checkpoint: str | None = None
    ssl: dict = field(default_factory=dict)
    pretrain_on: Literal["cohort", "training_folds", "manifest"] = "cohort"
    pretrain_manifest: str | None = None
    input_size: tuple[int, int, int] = (64, 64, 64)
    # optional: a registered network whose weights are not on this machine (e.g. `package` weights of
    # an extra that is not installed) is skipped with a warning and listed in the report's box
    optional: bool = False


@dataclass
class FinetuneEntry:
    """A 2D encoder fine-tuned on each training fold (``slice2vol.finetune``), then cached and pooled.

    Attributes:
        name: set name (the set is ``<name>/<aggregator>``).
        finetune: :class:`slice2vol.finetune.FinetuneConfig` fields (encoder, weights, mode, objective, ...);
            a ``supervised`` objective is trained on the evaluated label of each fold.
        aggregator: parameter-free pooling of the fine-tuned slice features.
        batch_size, dtype: caching options.
    """

    name: str
    finetune: dict = field(default_factory=dict)
    aggregator: str = "mean"
    batch_size: int = 32
    dtype: str = "float32"


@dataclass
class BaselineConfig:
    """Attributes:
    sets: computed baselines (``head_volume``, ``brain_volume``, ``intensities``; see
        :mod:`slice2vol.eval.baselines`).
    intensity_grid: side of the pooled lattice of ``intensities``.
    chance: add a ``chance`` row (stratified dummy / training mean) to every probe table.
    """

    sets: list[str] = field(default_factory=list)
    intensity_grid: int = 8
    chance: bool = True


@dataclass
class FeaturesEntry:
    """Brought-in features joined as an embedding set (see :func:`slice2vol.eval.baselines.read_features`).

    Attributes:
        name: the set's name in tables.
        path: CSV or ``.npz`` (``ids``, ``X``); ``${VAR:-default}`` expanded, relative to the repository.
        id_column: CSV column holding subject IDs.
        columns: CSV columns to use (default: every column but the ID and ``exclude``).
        exclude: CSV columns to leave out.
        log: take log1p of the values (volumes spanning orders of magnitude).
        fitted_on, fitted_labels: subjects (and labels) a model behind these features was fitted on,
            for the leakage guard.
    """

    name: str
    path: str
    id_column: str = "subject_id"
    columns: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    log: bool = False
    fitted_on: list[str] | None = None
    fitted_labels: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    """A whole comparison (``configs/experiments/*.yaml``)."""

    name: str = "experiment"
    cohort: CohortSection = field(default_factory=CohortSection)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    encoders: list[Encoder2DEntry] = field(default_factory=list)
    encoders3d: list[Encoder3DEntry] = field(default_factory=list)
    finetune: list[FinetuneEntry] = field(default_factory=list)
    features: list[FeaturesEntry] = field(default_factory=list)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    tasks: list[str] = field(default_factory=lambda: ["knn", "linear", "segmentation", "anomaly"])
    splits: SplitConfig = field(default_factory=SplitConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    primary_k: int = 10
    linear: LinearConfig = field(default_factory=LinearConfig)
    segmentation: SegConfig = field(default_factory=SegConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    reference: str | None = None
    # headline estimate of each metric: auto (fold mean for ROC AUC, pooled otherwise), pooled, fold_mean
    headline_estimate: Literal["auto", "pooled", "fold_mean"] = "auto"
    n_bootstrap: int = 1000
    n_permutations: int = 1000
    plots: list[str] = field(default_factory=lambda: ["umap", "tsne"])
    store_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    # blocks of tasks registered in slice2vol.eval.tasks that have no field above, by task name
    task_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # n_bootstrap=0 gave NaN intervals and n_permutations=0 p = 1 everywhere ("not significant" where
        # nothing was tested), both with exit 0
        for name in ("n_bootstrap", "n_permutations", "primary_k"):
            check_whole(name, getattr(self, name), 1)
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed!r}")
        if not self.tasks:  # ran every encoder, then ended "every task or label was skipped"
            raise ValueError("tasks must name at least one task (e.g. tasks=[knn,linear]), got []")


#: the embedding projections ``plots`` may name (slice2vol.eval.plots)
PROJECTIONS = ("umap", "tsne")

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
    """``random`` / ``hub[:tag]`` / ``pretrained`` / ``imagenet`` / ``package`` unchanged (the encoders
    resolve those words themselves, locally); anything else is a path taken from ``base``."""
    from slice2vol.encoders.base import PRETRAINED_WORDS  # the encoders' own list of weight words

    if weights == "random" or weights in PRETRAINED_WORDS or weights.startswith("hub"):
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
    data = _config.read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(data, overrides)
    fields = set(ExperimentConfig.__dataclass_fields__)
    params = dict(data.pop("task_params", None) or {})
    for key in [k for k in data if k not in fields and k in TASKS]:
        params[key] = data.pop(key) or {}
    data["task_params"] = params
    if isinstance(data.get("features"), dict):  # a single `features: {path: ..., id_column: ...}` block
        data["features"] = [data["features"]]
    if isinstance(data.get("features"), list):  # an entry's name defaults to its file's stem, as for one block
        data["features"] = [{**e, "name": e.get("name") or Path(str(e.get("path", "features"))).stem}
                            if isinstance(e, dict) else e for e in data["features"]]
    # through the module attribute, so a caller (or a test spy) sees every config this job builds
    try:
        cfg = _config.from_dict(ExperimentConfig, data, str(path))
    except ValueError as err:  # a section's own range check ('splits.n_folds must be ...') names no file
        raise _config.config_error(err, str(path), overrides) from None
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"{path}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    odd_plots = [p for p in cfg.plots if p not in PROJECTIONS]
    if odd_plots:  # found only after every probe had run, as a warning
        raise ConfigError(f"{path}: unknown plot(s) {odd_plots}; known: {', '.join(PROJECTIONS)}")
    if "knn" in cfg.tasks and cfg.primary_k not in cfg.knn.ks:
        # the headline k would silently be another one
        raise ConfigError(f"{path}: primary_k={cfg.primary_k} is not one of knn.ks {list(cfg.knn.ks)}; add it to "
                          "knn.ks or choose one of them")
    names = ([e.name for e in cfg.encoders] + [e.name for e in cfg.encoders3d] + [e.name for e in cfg.finetune]
             + [e.name for e in cfg.features] + list(cfg.baselines.sets) + (["chance"] if cfg.baselines.chance else []))
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: set and encoder names must be unique, got {names}")
    planned = ([f"{e.name}/{agg}" for e in cfg.encoders for agg in e.aggregators] + [e.name for e in cfg.encoders3d]
               + [f"{e.name}/{e.aggregator}" for e in cfg.finetune] + [e.name for e in cfg.features]
               + list(cfg.baselines.sets) + (["chance"] if cfg.baselines.chance else []))
    if cfg.reference is not None and cfg.reference not in planned:
        # a typo used to compare every set with the first one instead, with a warning in the log, exit 0
        raise ConfigError(f"{path}: reference {cfg.reference!r} is not one of the sets this experiment makes "
                          f"({', '.join(planned) or 'none'})")
    from slice2vol.aggregate import AGGREGATORS

    for entry in cfg.encoders:
        if not entry.key and not entry.store:
            raise ConfigError(f"{path}: encoder {entry.name!r} needs a key (with weights) or a store")
        odd = [a for a in entry.aggregators if a not in AGGREGATORS]
        if odd:  # found only after its slice features were cached
            raise ConfigError(f"{path}: encoder {entry.name!r}: unknown aggregator(s) {odd}; known: "
                              f"{', '.join(sorted(AGGREGATORS))}")
    for entry in cfg.encoders3d:
        if entry.pretrain_on == "manifest" and not entry.pretrain_manifest:
            raise ConfigError(f"{path}: encoders3d {entry.name!r}: pretrain_on=manifest needs pretrain_manifest")
    return cfg, repo_root_of(path)
