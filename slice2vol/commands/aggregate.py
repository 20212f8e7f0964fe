"""``slice2vol aggregate``: slice features in a store -> volume embeddings (or a CV estimate)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from slice2vol.commands import _common

HELP = "aggregate cached slice features into volume embeddings (mean, max, gem, mil, transformer, fusion, head3d)"
DESCRIPTION = HELP + """

Examples:
  slice2vol aggregate --store ixi.h5 --method mean
  slice2vol aggregate --store ixi.h5 --config configs/aggregate/mil.yaml --label sex --train-ids train.txt params.epochs=30
  slice2vol aggregate --store ixi.h5 --method mil --label age --cv 5 --cv-out runs/cv-mil-age.json
"""


@dataclass
class AggregateConfig:
    """What ``slice2vol aggregate`` runs (YAML under ``configs/aggregate/``; CLI flags win).

    Attributes:
        method: registered aggregator name.
        planes: planes to aggregate (``None``: all cached).
        label: label column for supervised fitting / cross-validation.
        name: embedding-set name (default derived from method, label, planes).
        params: the aggregator's constructor parameters.
    """

    method: str = "mean"
    planes: list[str] | None = None
    label: str | None = None
    name: str | None = None
    params: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_store(parser, required=False, help="feature store written by `slice2vol cache` (required unless --list)")
    _common.add_config(parser, help="YAML config, e.g. configs/aggregate/mil.yaml")
    parser.add_argument("--method", help="aggregator (see --list)")
    parser.add_argument("--planes", help="comma-separated planes (default: all cached)")
    parser.add_argument("--label", help="label column: supervised fitting, or the --cv target")
    parser.add_argument("--name", help="name of the written embedding set")
    parser.add_argument("--train-ids", metavar="FILE|all",
                        help="subjects a trainable aggregator is fitted on (one id per line), or 'all'")
    _common.add_out(parser, help="folder for attention arrays/plots (default: <store>_aggregate/<name>/)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw attention plots")
    parser.add_argument("--cv", type=int, metavar="K",
                        help="instead of writing embeddings, K-fold CV of the method on --label")
    parser.add_argument("--cv-out", metavar="FILE", help="JSON file for the --cv per-fold metrics")
    _common.add_seed(parser)
    _common.add_progress(parser)
    parser.add_argument("--list", action="store_true", help="list aggregators and exit")
    _common.add_overrides(parser)


@contextlib.contextmanager
def _params_named(cfg: AggregateConfig) -> Iterator[None]:
    """A params.* value of the wrong type, met inside the training loop as a TypeError, as one line."""
    try:
        yield
    except TypeError as err:
        raise ValueError(f"aggregator {cfg.method!r}: {err} (check the params.* values {cfg.params})") from None


def _read_ids(value: str) -> list[str] | str:
    from slice2vol.data.manifest import read_id_list

    return "all" if value == "all" else read_id_list(value, "--train-ids")


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from slice2vol.aggregate import AGGREGATORS, aggregate_store, cross_validate_aggregator, load_bags
    from slice2vol.aggregate.store import TASK_OF_LABEL_TYPE, open_store
    from slice2vol.config import load_config, resolve_config_path

    if args.list:
        for name in AGGREGATORS.names():
            cls = AGGREGATORS.get(name)
            trainable = "fusion: depends on base/mode" if name == "fusion" else (
                "trainable" if cls.requires_fit else "parameter-free")
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} {trainable:30s} {doc}")
        return 0
    if not args.store:
        raise ValueError("give the feature store with --store FILE (or --list)")
    config = resolve_config_path(args.config) if args.config else None  # a file, or a packaged config by name
    cfg = load_config(AggregateConfig, config, _common.overrides_of(args))
    for key in ("method", "label", "name"):
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))
    if args.planes:
        from slice2vol.data.slicing import split_planes

        cfg.planes = list(split_planes(args.planes))

    if args.cv is not None:
        if args.cv < 2:
            raise ValueError(f"--cv must be 2 or more folds, got {args.cv}")
        if not cfg.label:
            raise ValueError("--cv needs --label")
        store = open_store(args.store)
        labels = store.labels()
        if cfg.label not in labels.columns:
            raise ValueError(f"label {cfg.label!r} not in the store's labels {list(labels.columns)}")
        known = set(labels.index[labels[cfg.label].notna()])
        ids = [s for s in store.subjects() if s in known]
        ids, bags = load_bags(store, ids, cfg.planes, tokens=bool(getattr(AGGREGATORS.get(cfg.method), "wants_tokens", False)))
        task = TASK_OF_LABEL_TYPE.get(store.label_types.get(cfg.label), "classification")
        y = labels.loc[ids, cfg.label].to_numpy()
        if task == "classification":
            # scikit-learn's own refusal is a multi-line dump of every failed fit
            classes, counts = np.unique(y.astype(str), return_counts=True)
            if len(classes) < 2:
                raise ValueError(f"label {cfg.label!r} has one class only ({classes[0] if len(classes) else 'none'}) "
                                 f"among the {len(ids)} subjects with a value: nothing to classify")
            if counts.min() < args.cv:
                raise ValueError(f"label {cfg.label!r}: class {str(classes[counts.argmin()])!r} has {counts.min()} "
                                 f"subject(s), fewer than the {args.cv} folds of --cv")
        elif len(ids) < 2 * args.cv:
            raise ValueError(f"label {cfg.label!r}: {len(ids)} subjects with a value, too few for {args.cv} folds "
                             f"(needs >= {2 * args.cv})")
        params = dict(cfg.params)
        with _params_named(cfg):
            res = cross_validate_aggregator(bags, y, cfg.method, task=task, folds=args.cv, seed=args.seed,
                                            aggregator_seed=params.pop("seed", None), planes=cfg.planes, **params)
        for i, fold in enumerate(res.folds):
            print(f"fold {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in fold.items()))
        print(f"{cfg.method} {cfg.label} ({task}, {len(ids)} subjects, {args.cv}-fold, predictor "
              f"{res.predictor}): {res.format()}")
        if args.cv_out:
            Path(args.cv_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.cv_out).write_text(json.dumps({
                "method": cfg.method, "params": cfg.params, "planes": cfg.planes, "label": cfg.label,
                "task": task, "folds": res.folds, "summary": res.summary(), "predictor": res.predictor,
                "seed": args.seed, "n_subjects": len(ids), "store": str(args.store)}, indent=2))
        return 0

    if cfg.name is not None:  # before the aggregation runs: a name the store cannot hold is refused at once
        from slice2vol.cache import check_set_name

        check_set_name(cfg.name, args.store)
    train_ids = _read_ids(args.train_ids) if args.train_ids else None
    if isinstance(train_ids, list):
        from slice2vol.data.manifest import check_ids_known

        check_ids_known(args.train_ids, train_ids, open_store(args.store).subjects(), f"the store {args.store}")
    damaged: list[str] = []  # subjects whose cached rows fail their checksum: left out, listed, exit 1
    with _params_named(cfg):
        name = aggregate_store(args.store, cfg.method, planes=cfg.planes, name=cfg.name, train_ids=train_ids,
                               label=cfg.label, out_dir=args.out, plot=not args.no_plot, damaged=damaged,
                               train_ids_name=args.train_ids if isinstance(train_ids, list) else None,
                               **cfg.params)
    print(name)
    if damaged:
        print(f"{len(damaged)} subject(s) left out, their cached features are damaged (rerun the caching job on "
              "this store to recompute them):", file=sys.stderr)
        for message in damaged:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0
