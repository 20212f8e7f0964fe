"""Runs only the dense probe tasks (segmentation, anomaly) of an experiment, without the rest of ``bench``.

``slice2vol bench`` first caches every encoder's slice features for the k-NN/linear tasks (and trains
the 3D baselines) before any task runs; measuring or tuning the dense probes does not need that.
This entry point builds the same task context (cohort, result cache ``<out>/cache``, splits under
``<out>/splits``) and runs :mod:`slice2vol.eval.tasks.segmentation` / :mod:`slice2vol.eval.tasks.anomaly`
exactly as ``bench`` does, so a later ``slice2vol bench --out`` into the same folder reads their
results back from the cache instead of recomputing them::

    python -m slice2vol.eval.dense_run --config configs/experiments/ixi.yaml --out runs/ixi
    slice2vol bench --config configs/experiments/ixi.yaml --out runs/ixi      # probes: cached

Writes ``<out>/probes.json`` (rows, paired tests, figures, task extras, timings) and the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

PROBE_TASKS = ("segmentation", "anomaly")


def run_probes(cfg, base: Path, out: Path, *, tasks: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Runs the probe tasks of ``cfg`` (default: those of ``cfg.tasks``) into ``out``; returns the results."""
    from slice2vol.eval.cohort import resolve_cohort
    from slice2vol.eval.resultcache import ResultCache
    from slice2vol.eval.tasks import get_task
    from slice2vol.eval.tasks.base import TaskContext

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in (tasks or cfg.tasks) if t in PROBE_TASKS]
    if not tasks:
        raise ValueError(f"no probe task to run: the config's tasks are {list(cfg.tasks)}")
    cohort, manifest = resolve_cohort(cfg, base, out)
    timings: dict[str, float] = {}
    ctx = TaskContext(cfg=cfg, base=base, out=out, cohort=cohort, manifest=manifest,
                      reference=getattr(cfg, "reference", None), cache=ResultCache(out / "cache"), progress=progress,
                      timings=timings)
    results: dict = {"rows": [], "paired": [], "figures": [], "skipped": [], "tasks": {}, "timings_s": timings}
    for name in tasks:
        t0 = time.time()
        res = get_task(name).run(ctx)
        timings[f"task:{name}"] = round(time.time() - t0, 2)
        results["rows"] += res.rows
        results["paired"] += res.paired
        results["figures"] += res.figures
        results["skipped"] += res.skipped
        results["tasks"][name] = res.extras
    (out / "probes.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return results


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def summary_lines(results: dict) -> list[str]:
    """One line per (task, label, set, variant, metric) row and per paired test, for the console."""
    lines = []
    for r in results["rows"]:
        lines.append(f"{r['task']:12s} {r['label'][:40]:40s} {r['encoder'][:28]:28s} {str(r['variant'])[:40]:40s} "
                     f"{r['metric']:14s} {r['estimate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] n={r['n_subjects']}")
    for p in results["paired"]:
        lines.append(f"{p['task']:12s} {p['label'][:40]:40s} {p['encoder'][:28]:28s} - {p['reference'][:28]:28s} "
                     f"{p['metric']:8s} delta {p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] "
                     f"p_holm {p['p_holm']:.4f}")
    for s in results["skipped"]:
        lines.append(f"skipped: {s['name']}: {s['reason']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from slice2vol.commands import _common
    from slice2vol.commands._common import overrides_of, resolve_device
    from slice2vol.config import ConfigError
    from slice2vol.eval.experiment import load_experiment

    parser = argparse.ArgumentParser(prog="python -m slice2vol.eval.dense_run", description=__doc__,
                                     formatter_class=_common.HelpFormatter)
    _common.add_config(parser, required=True, help="experiment YAML, e.g. configs/experiments/ixi.yaml")
    _common.add_out(parser, required=True, help="output folder (the same as bench's --out to share its cache)")
    _common.add_device(parser)
    _common.add_seed(parser, default=None)
    _common.add_progress(parser)
    parser.add_argument("--tasks", default=None,
                        help="comma-separated probe tasks to run (default: the probe tasks of the config's tasks)")
    _common.add_overrides(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, base = load_experiment(args.config, overrides_of(args))
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    cfg.device = resolve_device(args.device or "auto")
    if args.seed is not None:
        cfg.seed = args.seed
    try:
        results = run_probes(cfg, base, Path(args.out), tasks=args.tasks.split(",") if args.tasks else None,
                             progress=not getattr(args, "no_progress", False))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
