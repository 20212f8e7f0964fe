"""``slice2vol bench``: run a whole comparison from an experiment config and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "benchmark encoders (k-NN, linear, segmentation, anomaly) from an experiment config; writes the report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiments/demo.yaml")
    parser.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. splits.n_repeats=3 tasks=[knn,linear]")


def run(args: argparse.Namespace) -> int:
    from slice2vol.config import ConfigError
    from slice2vol.eval.runner import IntegrationError, load_experiment, run_experiment

    try:
        cfg, base = load_experiment(args.config, list(getattr(args, "overrides", None) or []))
    except ConfigError as err:
        raise ValueError(str(err)) from None
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / cfg.name
    try:
        result = run_experiment(cfg, base=base, out=out, progress=not getattr(args, "no_progress", False),
                                config_path=str(args.config))
    except IntegrationError as err:
        raise ValueError(f"pipeline piece missing: {err}") from None
    paths = result["paths"]
    print(f"[bench] report: {paths['report.html']}")
    print(f"[bench] results: {paths['results.csv']} ({len(result['rows'])} rows), {paths['results.json']}")
    print(f"[bench] time: {result['timings'].get('total', 0):.1f} s")
    return 1 if result["failures"] else 0
