"""Measurements behind the benchmark protocol (docs/benchmark.md cites them): reproducible, seeded.

``python -m slice2vol.eval.checks noise-mil``
    Pure-noise slice features (no signal at all) with real labels: attention-MIL fitted inside the
    training folds (how ``bench`` does it) against the same MIL fitted once on every subject with the
    labels (the leak ``bench`` refuses). ROC AUC of the linear and k-NN probes on the same folds,
    both estimators, per seed and mean +- sd over seeds. Labels: ``--manifest`` + ``--label`` (e.g.
    the 48 IXI sex labels), else 48 balanced synthetic ones.
``python -m slice2vol.eval.checks pooled-vs-fold-mean``
    Random features, linear probe, K-fold x R: pooled out-of-fold AUC against the fold mean (why the
    headline AUC is the fold mean).
``python -m slice2vol.eval.checks cosine --store STORE --set mean``
    Median pairwise cosine of a volume-embedding set, raw and centred (why k-NN centres features).
``python -m slice2vol.eval.checks same-scans --config CONFIG --out DIR [key=value ...]``
    One subject of the config's cohort saved again as ``.nii`` under a second ID (other bytes, same
    voxels), then ``bench`` (k-NN only): per volume set, the copy's distance and the closest pair of
    distinct scans as fractions of the set's median nearest-neighbour distance (the bench calls two
    subjects one scan below 1e-3), and the groups the bench left out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


def _labels(manifest: str | None, label: str, n: int) -> tuple[list[str], np.ndarray]:
    if manifest:
        from slice2vol.data.manifest import load_manifest

        table = load_manifest(manifest).labels()
        column = table[label].dropna()
        return [str(s) for s in column.index], column.astype(str).to_numpy()
    ids = [f"sub-{i:02d}" for i in range(n)]
    return ids, np.array(["F", "M"])[np.arange(n) % 2]


def noise_store(path: Path, ids: Sequence[str], y: np.ndarray, label: str, *, dim: int = 16, seed: int = 0) -> Path:
    """A feature store of pure N(0, 1) slice features (3 planes, 8-12 slices each), labels attached."""
    from slice2vol.cache import FeatureStore, PlaneFeatures, SubjectFeatures

    rng = np.random.default_rng(seed)
    subjects = []
    for sid, value in zip(ids, y):
        planes = {}
        for plane, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
            s = int(rng.integers(8, 13))
            positions = np.zeros((s, 3))
            positions[:, axis] = np.arange(s) * 4.0
            planes[plane] = PlaneFeatures(rng.normal(size=(s, dim)).astype(np.float32), np.arange(s), positions)
        subjects.append(SubjectFeatures(str(sid), planes, {label: str(value)}))
    store = FeatureStore(path, mode="a")
    with store.writer_lock():
        store.commit_subjects(subjects, {"encoder": "pure noise"}, dtype="float32", label_types={label: "categorical"})
    return path


def _config(tasks, n_folds: int, n_repeats: int, seed: int, n_boot: int):
    from slice2vol.eval.experiment import ExperimentConfig
    from slice2vol.eval.knn import KNNConfig
    from slice2vol.eval.splits import SplitConfig

    return ExperimentConfig(tasks=list(tasks), splits=SplitConfig(n_folds=n_folds, n_repeats=n_repeats, seed=seed),
                            knn=KNNConfig(ks=(10,)), primary_k=10, n_bootstrap=n_boot, n_permutations=10, seed=seed)


def _auc_rows(ev: dict) -> list[dict]:
    keep = {"knn": "k=10 weighted", "linear": "logistic"}
    return [{k: r[k] for k in ("task", "encoder", "pooled", "fold_mean", "ci_low", "ci_high")}
            for r in ev["rows"] if r["metric"] == "roc_auc" and keep.get(r["task"]) == r["variant"]]


def noise_mil(ids: list[str], y: np.ndarray, label: str, seeds: Sequence[int], mil: dict, work: Path,
              n_folds: int = 5, n_repeats: int = 1, n_boot: int = 200) -> list[dict]:
    """Rows ``{seed, task, encoder, pooled, fold_mean, ci_low, ci_high}`` for both ways of fitting MIL."""
    import pandas as pd

    from slice2vol.aggregate import aggregate_store
    from slice2vol.cache import FeatureStore
    from slice2vol.eval.nested import FoldFittedAggregator
    from slice2vol.eval.runner import evaluate_sets
    from slice2vol.eval.sets import EmbeddingSet

    labels = pd.DataFrame({label: y}, index=pd.Index(ids, name="subject_id"))
    out = []
    for seed in seeds:
        store = noise_store(work / f"noise-{seed}.h5", ids, y, label, seed=seed)
        params = {**mil, "seed": seed}
        inside = FoldFittedAggregator("mil inside folds", store, "mil", params, ids=ids)
        name = aggregate_store(store, "mil", label=label, train_ids="all", name="mil-all", plot=False, **params)
        sids, X, _ = FeatureStore(store, mode="r").volume_embeddings(name)
        sets = {"mil inside folds": inside, "mil on all subjects": EmbeddingSet("mil on all subjects", list(sids), X)}
        cfg = _config(["linear", "knn"], n_folds, n_repeats, seed, n_boot)
        ev = evaluate_sets(sets, labels, {label: "categorical"}, cfg, work / f"splits-{seed}")
        out += [{"seed": seed, **r} for r in _auc_rows(ev)]
    return out


def pooled_vs_fold_mean(ids: list[str], y: np.ndarray, label: str, seeds: Sequence[int], dim: int, work: Path,
                        n_folds: int = 5, n_repeats: int = 2) -> list[dict]:
    """Linear-probe AUC of random features per seed: pooled and fold mean."""
    import pandas as pd

    from slice2vol.eval.runner import evaluate_sets
    from slice2vol.eval.sets import EmbeddingSet

    labels = pd.DataFrame({label: y}, index=pd.Index(ids, name="subject_id"))
    out = []
    for seed in seeds:
        X = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
        cfg = _config(["linear"], n_folds, n_repeats, seed, 50)
        ev = evaluate_sets({"random": EmbeddingSet("random", ids, X)}, labels, {label: "categorical"}, cfg,
                           work / f"splits-{seed}")
        out += [{"seed": seed, **r} for r in _auc_rows(ev)]
    return out


def median_cosine(X: np.ndarray) -> tuple[float, float]:
    """(median pairwise cosine of the rows, the same after subtracting the mean row)."""
    def med(Z):
        Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        S = Z @ Z.T
        return float(np.median(S[np.triu_indices(len(Z), 1)]))

    X = np.asarray(X, dtype=np.float64)
    return med(X), med(X - X.mean(0))


def scan_margins(ids: Sequence[str], X: np.ndarray, pair: tuple[str, str]) -> dict:
    """Where a known copy and the distinct scans lie, relative to the median nearest-neighbour distance.

    Args:
        ids: (N,) subject IDs; X: (N, D) their vectors; pair: the two IDs of one scan.

    Returns:
        ``{n, median_nn, copy, closest_distinct, closest_ids}``: the copy's distance and the smallest
        distance between two other subjects, both divided by the median nearest-neighbour distance.
    """
    from sklearn.neighbors import NearestNeighbors

    def nearest(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist, index = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(Z).kneighbors(Z)
        return dist[:, 1], index[:, 1]

    X = np.asarray(X, dtype=np.float64)
    median = float(np.median(nearest(X)[0]))
    a, b = list(ids).index(pair[0]), list(ids).index(pair[1])
    others = [i for i in range(len(ids)) if i not in (a, b)]
    dist, index = nearest(X[others])
    k = int(np.argmin(dist))
    return {"n": len(ids), "median_nn": median, "copy": float(np.linalg.norm(X[a] - X[b])) / median,
            "closest_distinct": float(dist[k]) / median,
            "closest_ids": sorted([str(ids[others[k]]), str(ids[others[int(index[k])]])])}


def same_scan_check(config: str, out: Path, overrides: Sequence[str] = (), subject: int = 0) -> dict:
    """Saves subject ``subject`` of the config's cohort again as ``.nii`` under the ID ``copy-of-<id>``
    (a manifest of absolute paths in ``out``), runs ``bench`` with k-NN only into ``out / "run"``, and
    measures every volume set of its stores with :func:`scan_margins`.

    Returns:
        ``{"pair", "same_scans" (the bench's groups), "sets": {store/set: margins}, "exit"}``.
    """
    import nibabel as nib
    import pandas as pd

    from slice2vol.cache import FeatureStore
    from slice2vol.cli import main as cli_main
    from slice2vol.eval.cohort import resolve_cohort
    from slice2vol.eval.experiment import load_experiment

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, base = load_experiment(config, overrides)
    cohort, _ = resolve_cohort(cfg, base, out / "source")
    rows = []
    for s in cohort.subjects:
        row = {"subject_id": s.subject_id, **{m: str(p) for m, p in s.images.items()}}
        if s.seg is not None:
            row["seg"] = str(s.seg)
        rows.append({**row, **{k: v for k, v in s.labels.items()}})
    original = cohort.subjects[subject]
    modality, image = next(iter(original.images.items()))
    loaded = nib.load(image)
    copy = out / f"copy-of-{original.subject_id}.nii"
    nib.save(type(loaded)(np.asarray(loaded.dataobj), loaded.affine, loaded.header), copy)
    twin = {**rows[subject], "subject_id": f"copy-of-{original.subject_id}", modality: str(copy)}
    rows.insert(subject + 1, twin)  # right after the original: a max_subjects limit keeps both
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run = out / "run"
    code = cli_main(["bench", "--config", str(config), "--out", str(run), "--no-progress", *overrides,
                     f"cohort.manifest={manifest}", "cohort.synthetic=null", "tasks=[knn]"]
                    + ([f"cohort.max_subjects={cfg.cohort.max_subjects + 1}"] if cfg.cohort.max_subjects else []))
    results = json.loads((run / "results.json").read_text())
    pair = (original.subject_id, twin["subject_id"])
    sets = {}
    for path in sorted((run / "stores").glob("*.h5")):
        store = FeatureStore(path, mode="r")
        for name in store.volume_embedding_names():
            ids, X, _ = store.volume_embeddings(name)
            if set(pair) <= set(ids) and len(ids) >= 4:
                sets[f"{path.stem}/{name}"] = scan_margins(ids, X, pair)
    return {"pair": list(pair), "same_scans": results["cohort"].get("same_scans"), "sets": sets, "exit": code}


def _summarise(rows: list[dict]) -> list[str]:
    lines = [f"{'seed':>4} {'task':<7} {'set':<22} {'pooled':>7} {'fold mean':>9}  95% CI (fold mean)"]
    lines += [f"{r['seed']:>4} {r['task']:<7} {r['encoder']:<22} {r['pooled']:7.3f} {r['fold_mean']:9.3f}  "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for r in rows]
    lines.append("mean +- sd over seeds:")
    for key in sorted({(r["task"], r["encoder"]) for r in rows}):
        sel = [r for r in rows if (r["task"], r["encoder"]) == key]
        p, f = np.array([r["pooled"] for r in sel]), np.array([r["fold_mean"] for r in sel])
        lines.append(f"     {key[0]:<7} {key[1]:<22} pooled {p.mean():.3f} +- {p.std(ddof=1) if len(p) > 1 else 0:.3f}"
                     f"   fold mean {f.mean():.3f} +- {f.std(ddof=1) if len(f) > 1 else 0:.3f}")
    return lines


def _at_least(low: int):
    """argparse type: a whole number >= ``low`` (0 subjects or 0 epochs failed deep in a job)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    from slice2vol.commands._common import seed_type

    parser = argparse.ArgumentParser(prog="python -m slice2vol.eval.checks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    for name in ("noise-mil", "pooled-vs-fold-mean"):
        p = sub.add_parser(name)
        p.add_argument("--manifest", help="take subject IDs and labels from this manifest (else 48 synthetic)")
        p.add_argument("--label", default="sex")
        p.add_argument("--n", type=_at_least(10), default=48, help="synthetic subjects (without --manifest)")
        p.add_argument("--seeds", type=seed_type, nargs="+", default=[0, 1, 2])
        p.add_argument("--json", help="also write the rows to this JSON file")
        if name == "noise-mil":
            p.add_argument("--epochs", type=_at_least(1), default=40)
        else:
            p.add_argument("--dim", type=_at_least(1), default=64)
    p = sub.add_parser("cosine")
    p.add_argument("--store", required=True)
    p.add_argument("--set", default="mean")
    p = sub.add_parser("same-scans")
    p.add_argument("--config", required=True, help="a bench config (its encoders and cohort)")
    p.add_argument("--out", required=True, help="folder for the manifest, the copy and the bench run")
    p.add_argument("--subject", type=int, default=0, help="which subject of the cohort to save again")
    p.add_argument("--json", help="also write the margins to this JSON file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config, as for bench")
    args = parser.parse_args(argv)
    if args.check == "same-scans":
        res = same_scan_check(args.config, Path(args.out), args.overrides, args.subject)
        print(f"{res['pair'][1]} is {res['pair'][0]} saved again as .nii; bench left out: {res['same_scans']}")
        print(f"{'set':<40} {'n':>4} {'median NN':>10} {'copy / median':>14} {'closest distinct / median':>26}")
        for name, m in res["sets"].items():
            print(f"{name:<40} {m['n']:>4} {m['median_nn']:>10.3g} {m['copy']:>14.2e} {m['closest_distinct']:>26.3f}"
                  f"  ({', '.join(m['closest_ids'])})")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    if args.check == "cosine":
        from slice2vol.cache import FeatureStore

        _, X, _ = FeatureStore(args.store, mode="r").volume_embeddings(args.set)
        raw, centred = median_cosine(X)
        print(f"{args.store} / {args.set}: {len(X)} subjects x {X.shape[1]}: median pairwise cosine {raw:.3f} raw, "
              f"{centred:.3f} centred")
        return 0
    ids, y = _labels(args.manifest, args.label, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        if args.check == "noise-mil":
            mil = {"hidden": 64, "attn_dim": 32, "epochs": args.epochs, "lr": 0.001, "dropout": 0.25}
            rows = noise_mil(ids, y, args.label, args.seeds, mil, Path(tmp))
        else:
            rows = pooled_vs_fold_mean(ids, y, args.label, args.seeds, args.dim, Path(tmp))
    print(f"{len(ids)} subjects, label {args.label} ({', '.join(f'{c}: {int((y == c).sum())}' for c in np.unique(y))})")
    print("\n".join(_summarise(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
