"""Regenerates the CPU-budget table of docs/ssl.md: one 3D SSL configuration trained within <= 30 CPU-minutes,
against the down-sampled-intensity baseline with paired intervals, with its learning curve.

The config (default ``configs/ssl/cpu_budget.yaml``) is pretrained on the dev cohort (checkpoints kept
along the way); each kept checkpoint and the initialisation (the same network, untrained: the control
that tells what the pretraining added) are embedded whole-head and probed with the benchmark's tasks
on the same repeated splits as the baseline (the head fitted into the same grid, average-pooled to 8^3
= 512 intensities).

    python scripts/reproduce/ssl_budget.py --out runs/ssl_budget [--docs docs/ssl.md]

Reruns resume the run and reuse embeddings and probe results (under --out).
Tables: ``ssl_budget_result`` and ``ssl_budget_curve`` (markers in the docs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_common import (REPO, embed_checkpoints, evaluate, fmt_ci, fmt_delta, intensity_baseline, load_cohort,
                        markdown, paired, publish, row, save_json, stamp, train)

BASELINE = "baseline/intensity-8cube"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort CSV (default: the IXI dev cohort)")
    parser.add_argument("--config", default=str(REPO / "configs" / "ssl" / "cpu_budget.yaml"))
    parser.add_argument("--out", default="runs/ssl_budget", help="working folder")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the 5-fold CV")
    parser.add_argument("--docs", help="write the tables into this markdown file (between BEGIN/END markers)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. train.steps=100)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cohort = load_cohort(args.manifest)
    cfg, result = train(args.config, out / "run", cohort, [f"data.cache_dir={out / 'volumes'}", *args.overrides])
    size = tuple(cfg.data.volume_size)
    steps = embed_checkpoints(out / "run", cohort, size, out / "embeddings.h5")
    name = f"ssl3d/{cfg.method}"
    sets = {f"{name}@{s}": (ids, X) for s, (ids, X, _) in steps.items()}
    sets[BASELINE] = intensity_baseline(cohort, size)
    results = evaluate(sets, cohort, BASELINE, out / "eval", n_repeats=args.repeats)
    save_json(out / "results.json", {"rows": results["rows"], "paired": results["paired"],
                                     "training": {"cpu_s": result.cpu_s, "wall_s": result.wall_s,
                                                  "steps": result.step, "cost": result.cost}})
    final = max(steps)
    config = Path(args.config)
    config = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    command = f"python scripts/reproduce/ssl_budget.py --config {config} --out {args.out}"
    if args.repeats != 5:
        command += f" --repeats {args.repeats}"
    if args.overrides:
        command += " " + " ".join(args.overrides)
    table = []
    for label, metric, digits in (("sex", "roc_auc", 2), ("age", "mae", 1)):
        for probe in ("linear", "knn"):
            for shown, set_name in ((f"{name}, {final} steps", f"{name}@{final}"),
                                    ("same network untrained (step 0)", f"{name}@0"),
                                    ("baseline: 512 intensities", BASELINE)):
                table.append([label, {"linear": "linear", "knn": "k-NN (k=10)"}[probe], shown,
                              fmt_ci(row(results, set_name, label, probe, metric), digits),
                              fmt_delta(paired(results, set_name, label, probe, metric), digits)
                              if set_name != BASELINE else ""])
    curve = []
    for s in sorted(steps):
        sex = row(results, f"{name}@{s}", "sex", "linear", "roc_auc")
        age = row(results, f"{name}@{s}", "age", "linear", "mae")
        psex = paired(results, f"{name}@{s}", "sex", "linear", "roc_auc")
        page = paired(results, f"{name}@{s}", "age", "linear", "mae")
        curve.append([str(s), fmt_ci(sex), fmt_delta(psex), fmt_ci(age, 1), fmt_delta(page, 1)])
    n = len(cohort.ids)
    gflops = (result.cost or {}).get("flops_per_step", float("nan")) / 1e9
    tables = {
        "ssl_budget_result": (
            f"`{command}` ({stamp()}; {n} subjects; training: {result.step} steps, {result.cpu_s / 60:.1f} CPU-minutes "
            f"({result.wall_s / 60:.0f} min wall on the shared machine), {gflops:.1f} GFLOPs/step; 5-fold CV x "
            f"{args.repeats} repeats; sex ROC AUC = mean over test folds, age MAE (years) pooled; [95% bootstrap CI]; "
            "delta = set - baseline, paired bootstrap CI, Holm-adjusted permutation p)\n\n"
            + markdown(["label", "probe", "embedding", "estimate [95% CI]", "delta vs baseline [95% CI]"], table)),
        "ssl_budget_curve": (
            f"`{command}` (linear probe at every kept checkpoint; step 0 = the initialisation)\n\n"
            + markdown(["step", "sex AUC", "delta vs baseline", "age MAE", "delta vs baseline"], curve)),
    }
    publish(tables, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
