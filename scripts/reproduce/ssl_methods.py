"""Regenerates the CPU-scale tables of docs/ssl.md: the six 3D SSL methods on the dev cohort.

Each method's ``configs/ssl/<method>_cpu.yaml`` is pretrained for ``--steps`` steps (checkpoints kept
every ``--keep-every``), every kept checkpoint and the initialisation are embedded whole-head, and
the benchmark's probes score them against the down-sampled-intensity baseline (the head fitted into
the same 48^3 grid, average-pooled to 8^3 = 512 intensities) and the untrained network.

    python scripts/reproduce/ssl_methods.py --out runs/ssl_methods [--docs docs/ssl.md]

Reruns resume finished runs and reuse embeddings and probe results (everything lives under --out).
Tables: ``ssl_methods_training``, ``ssl_methods_probes``, ``ssl_methods_curves`` (markers in the docs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_common import (REPO, embed_checkpoints, evaluate, fmt_ci, fmt_delta, intensity_baseline, load_cohort,
                        markdown, paired, publish, row, save_json, stamp, train)

METHODS = ("autoencoder", "genesis", "mae", "simclr", "jigsaw", "rotation")
BASELINE = "baseline/intensity-8cube"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort CSV (default: the IXI dev cohort)")
    parser.add_argument("--out", default="runs/ssl_methods", help="working folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--keep-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the 5-fold CV")
    parser.add_argument("--docs", help="write the tables into this markdown file (between BEGIN/END markers)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cohort = load_cohort(args.manifest)
    command = ("python scripts/reproduce/ssl_methods.py --out " + str(args.out)
               + (f" --steps {args.steps}" if args.steps != 150 else ""))
    runs, sets, training = {}, {}, []
    for method in args.methods:
        cfg, result = train(REPO / "configs" / "ssl" / f"{method}_cpu.yaml", out / method, cohort,
                            [f"train.steps={args.steps}", f"train.keep_every={args.keep_every}",
                             f"data.cache_dir={out / 'volumes'}"])
        runs[method] = cfg
        size = tuple(cfg.data.volume_size)
        steps = embed_checkpoints(out / method, cohort, size, out / "embeddings.h5")
        for step, (ids, X, _) in steps.items():
            sets[f"ssl3d/{method}@{step}"] = (ids, X)
        hist = result.history
        extra = [k for k in ("acc", "view_acc") if k in hist[-1]]
        training.append([method, f"{hist[0]['loss']:.3f}", f"{hist[-1]['loss']:.3f}",
                         f"{extra[0]} {hist[-1][extra[0]]:.2f}" if extra else "-",
                         f"{(result.cost or {}).get('flops_per_step', float('nan')) / 1e9:.1f}",
                         f"{result.cpu_s:.0f}", f"{result.wall_s:.0f}"])
    volume_size = tuple(next(iter(runs.values())).data.volume_size)
    sets[BASELINE] = intensity_baseline(cohort, volume_size)
    results = evaluate(sets, cohort, BASELINE, out / "eval", n_repeats=args.repeats)
    save_json(out / "results.json", {"rows": results["rows"], "paired": results["paired"]})

    last = {m: max(int(k.rsplit("@", 1)[1]) for k in sets if k.startswith(f"ssl3d/{m}@")) for m in args.methods}
    probes = []
    for name in [f"ssl3d/{m}@{last[m]}" for m in args.methods] + [f"ssl3d/{m}@0" for m in args.methods[:1]] + [BASELINE]:
        shown = name.replace("@0", " (untrained, step 0)") if name.endswith("@0") else name.split("@")[0]
        probes.append([shown, fmt_ci(row(results, name, "sex", "linear", "roc_auc")),
                       fmt_ci(row(results, name, "sex", "knn", "roc_auc")),
                       fmt_ci(row(results, name, "age", "linear", "mae"), 1),
                       fmt_ci(row(results, name, "age", "knn", "mae"), 1),
                       fmt_delta(paired(results, name, "sex", "linear", "roc_auc")),
                       fmt_delta(paired(results, name, "age", "linear", "mae"), 1)])
    curves = []
    steps_all = sorted({int(k.rsplit("@", 1)[1]) for k in sets if k.startswith("ssl3d/")})
    for m in args.methods:
        cells = []
        for s in steps_all:
            sex = row(results, f"ssl3d/{m}@{s}", "sex", "linear", "roc_auc")
            age = row(results, f"ssl3d/{m}@{s}", "age", "linear", "mae")
            cells.append("-" if sex is None else f"{sex['estimate']:.2f} / {age['estimate']:.1f}")
        curves.append([m, *cells])
    base_sex = row(results, BASELINE, "sex", "linear", "roc_auc")
    base_age = row(results, BASELINE, "age", "linear", "mae")
    curves.append(["baseline (512 intensities)", *[f"{base_sex['estimate']:.2f} / {base_age['estimate']:.1f}"]
                   * len(steps_all)])
    n = len(cohort.ids)
    tables = {
        "ssl_methods_training": (
            f"`{command}` ({stamp()}; CPU s = user + system seconds of the training process, wall s on a shared "
            "machine: only the CPU column compares between machines)\n\n"
            + markdown(["method", "first loss", "final loss", "pretext metric", "GFLOPs/step", "CPU s", "wall s"],
                       training)),
        "ssl_methods_probes": (
            f"`{command}` ({stamp()}; {n} subjects, 5-fold CV x {args.repeats} repeats; sex: ROC AUC, mean over "
            "test folds; age: MAE in years, pooled; [95% bootstrap CI]; delta = set - baseline with its paired "
            "bootstrap CI and Holm-adjusted permutation p)\n\n"
            + markdown(["embedding", "sex AUC, logistic", "sex AUC, k-NN (k=10)", "age MAE, ridge",
                        "age MAE, k-NN (k=10)", "delta sex AUC vs baseline (logistic)",
                        "delta age MAE vs baseline (ridge)"], probes)),
        "ssl_methods_curves": (
            f"`{command}` (linear probe, sex ROC AUC / age MAE per pretraining step; step 0 = the initialisation)\n\n"
            + markdown(["method", *[f"step {s}" for s in steps_all]], curves)),
    }
    publish(tables, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
