#!/usr/bin/env python
"""Native-3D encoders on a labelled cohort: sex ROC AUC and age MAE with subject-level CV, time per volume.

Each encoder embeds every subject once (``slice2vol.encoders3d.embed_cohort3d``, cached and resumable in
``<out>/<name>.h5``); the embeddings are then scored with the benchmark's own pieces, read-only:
``slice2vol.eval.splits.make_splits`` (repeated stratified K-fold over subjects),
``slice2vol.eval.linear.LinearProbe`` (standardise + L2 logistic / ridge, penalty chosen inside the
training fold) and ``slice2vol.eval.metrics`` (pooled out-of-fold metric, subject-level bootstrap CI).

    python scripts/eval_encoders3d.py                       # IXI (SLICE2VOL_IXI or ../shared/data/ixi-hh-2mm)
    python scripts/eval_encoders3d.py --encoders deepbet,monai-resnet18 --folds 5 --repeats 2
    python scripts/eval_encoders3d.py --manifest my.csv --sex-column sex --age-column age --out runs/e3d

Prints a Markdown table (also in ``<out>/results.md`` and ``results.json``). Embedding times depend on the
machine and its load: quote them with the thread count printed next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (key, weights, kwargs): the rows of the table
ENCODERS = {
    "deepbet": ("3d/deepbet", "package", {}),
    "deepbet-bbox": ("3d/deepbet", "package", {"networks": ["bbox"]}),
    # the untrained control of deepbet-bbox: same network, same input and pooling, seeded random weights
    "deepbet-bbox-random": ("3d/deepbet", "random", {"networks": ["bbox"]}),
    "monai-resnet18": ("3d/monai_resnet18", "random", {}),
}


def default_manifest() -> Path:
    root = Path(os.environ.get("SLICE2VOL_IXI", REPO.parent / "shared" / "data" / "ixi-hh-2mm"))
    return root / "participants.csv"


def out_of_fold(X: np.ndarray, y: np.ndarray, ids: list[str], kind: str, folds: int, repeats: int,
                seed: int) -> np.ndarray:
    """(R, N) scores (probability of the second class) or predictions, each subject predicted by a probe
    fitted on the other folds."""
    from slice2vol.eval.linear import LinearProbe
    from slice2vol.eval.splits import SplitConfig, make_splits

    splits = make_splits(ids, y, kind, cfg=SplitConfig(n_folds=folds, n_repeats=repeats, seed=seed))
    task = "classification" if kind == "categorical" else "regression"
    preds = np.zeros((repeats, len(ids)))
    for fold in splits.folds:
        train, test = splits.positions(ids, fold)
        probe = LinearProbe(task, seed=seed).fit(X[train], y[train])
        if task == "classification":
            column = list(probe.classes_).index(np.unique(y)[1])
            preds[fold.repeat, test] = probe.predict_proba(X[test])[:, column]
        else:
            preds[fold.repeat, test] = probe.predict(X[test])
    return preds


def mean_baseline_mae(y: np.ndarray, ids: list[str], folds: int, repeats: int, seed: int) -> float:
    """MAE of predicting the training-fold mean age (the floor every encoder must beat)."""
    from slice2vol.eval.splits import SplitConfig, make_splits

    splits = make_splits(ids, y, "continuous", cfg=SplitConfig(n_folds=folds, n_repeats=repeats, seed=seed))
    errors = np.zeros((repeats, len(ids)))
    for fold in splits.folds:
        train, test = splits.positions(ids, fold)
        errors[fold.repeat, test] = np.abs(y[test] - y[train].mean())
    return float(errors.mean())


def embed(name: str, key: str, weights: str, kwargs: dict, cohort, out: Path, device: str, progress: bool) -> dict:
    """Embeds the cohort (or reuses the stored set) and returns ids, X and provenance."""
    from slice2vol.cache import FeatureStore
    from slice2vol.encoders3d import build_encoder3d, embed_cohort3d

    store = out / f"{name}.h5"
    if not (FeatureStore(store).exists() and name in FeatureStore(store).volume_embedding_names()):
        encoder = build_encoder3d(key, weights, **kwargs).to(device)
        report = embed_cohort3d(encoder, cohort, store, name, progress=progress)
        for failure in report.failures:
            print(f"  {name}: failed {failure}", file=sys.stderr)
    ids, X, prov = FeatureStore(store).volume_embeddings(name)
    return {"ids": [str(i) for i in ids], "X": X, "prov": prov}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(default_manifest()), help="cohort CSV with sex and age columns")
    parser.add_argument("--out", default="runs/eval_encoders3d", help="folder for stores and results")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated subset of {list(ENCODERS)}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=KEY:WEIGHTS",
                        help="an extra row, e.g. r10=3d/monai_resnet10:random (repeatable)")
    parser.add_argument("--kwargs", action="append", default=[], metavar="NAME.OPTION=VALUE",
                        help="encoder option of a row, YAML value, e.g. deepbet.shape=[128,128,128]")
    parser.add_argument("--sex-column", default="sex")
    parser.add_argument("--age-column", default="age")
    parser.add_argument("--max-subjects", type=int, default=None)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import yaml

    from slice2vol.commands._common import resolve_device
    from slice2vol.data.manifest import load_manifest
    from slice2vol.eval.metrics import bootstrap_ci, metric_fn

    rows = {n: ENCODERS[n] for n in args.encoders.split(",") if n}
    unknown = [n for n in args.encoders.split(",") if n and n not in ENCODERS]
    if unknown:
        parser.error(f"unknown encoder row(s) {unknown}; known {list(ENCODERS)} (add others with --set)")
    for item in args.set:
        name, spec = item.split("=", 1)
        key, _, weights = spec.partition(":")
        rows[name] = (key, weights or "random", {})
    for item in args.kwargs:
        target, value = item.split("=", 1)
        name, option = target.split(".", 1)
        rows[name][2][option] = yaml.safe_load(value)

    cohort = load_manifest(args.manifest)
    if args.max_subjects:
        cohort = cohort.subset(cohort.ids[: args.max_subjects])
    table = cohort.labels()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    results = {"manifest": str(args.manifest), "n_subjects": len(cohort), "folds": args.folds,
               "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "device": device, "rows": []}

    ages = table[args.age_column].astype(float)
    results["age_mae_predict_mean"] = mean_baseline_mae(ages.to_numpy(), list(table.index), args.folds,
                                                        args.repeats, args.seed)
    for name, (key, weights, kwargs) in rows.items():
        t0 = time.time()
        emb = embed(name, key, weights, kwargs, cohort, out, device, not args.no_progress)
        ids, X = emb["ids"], emb["X"].astype(np.float64)
        row = {"name": name, "key": key, "weights": emb["prov"].get("weights"), "kwargs": kwargs, "dim": X.shape[1],
               "n": len(ids), "seconds_per_volume": emb["prov"].get("seconds_per_volume"),
               "weights_sha256": emb["prov"].get("weights_sha256", "")}
        labels = table.loc[ids]
        sex = labels[args.sex_column].astype(str).to_numpy()
        classes = np.unique(sex)
        p = out_of_fold(X, sex, ids, "categorical", args.folds, args.repeats, args.seed)
        proba = np.stack([1 - p, p], axis=-1)  # (R, N, 2) in the order of ``classes``
        row["sex_auc"] = bootstrap_ci(sex, proba, metric_fn("roc_auc", "categorical", classes),
                                      n_boot=args.n_bootstrap, seed=args.seed)
        age = labels[args.age_column].astype(float).to_numpy()
        pred = out_of_fold(X, age, ids, "continuous", args.folds, args.repeats, args.seed)
        row["age_mae"] = bootstrap_ci(age, pred, metric_fn("mae", "continuous"), n_boot=args.n_bootstrap,
                                      seed=args.seed)
        row["wall_seconds"] = round(time.time() - t0, 1)
        results["rows"].append(row)
        print(f"{name}: sex AUC {row['sex_auc'][0]:.3f}, age MAE {row['age_mae'][0]:.2f} y "
              f"({row['seconds_per_volume']} s/volume)", file=sys.stderr)

    lines = ["| encoder | weights | dim | sex ROC AUC (logistic) | age MAE, years (ridge) | s / volume |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        auc, mae = row["sex_auc"], row["age_mae"]
        opts = ", ".join(f"{k}={v}" for k, v in row["kwargs"].items())
        lines.append(f"| {row['name']} (`{row['key']}`{', ' + opts if opts else ''}) | {row['weights']} | {row['dim']} "
                     f"| {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}] | {mae[0]:.2f} [{mae[1]:.2f}, {mae[2]:.2f}] "
                     f"| {row['seconds_per_volume']:.2f} |")
    lines.append(f"| predict the training-fold mean age | | | | {results['age_mae_predict_mean']:.2f} | |")
    text = "\n".join(lines)
    footer = (f"\n{results['n_subjects']} subjects, {args.folds}-fold CV x {args.repeats} repeats (subject-level, "
              f"stratified), pooled out-of-fold metric with {args.n_bootstrap}-sample subject bootstrap 95% CI; "
              f"{results['torch_threads']} torch threads on {device}.")
    print(text + footer)
    (out / "results.md").write_text(text + footer + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
