"""``slice2vol bench``: run a whole comparison from an experiment config and write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slice2vol.commands import _common

HELP = "benchmark encoders (k-NN, linear, segmentation, anomaly, ...) from an experiment config; writes the report"
DESCRIPTION = HELP + """

Examples:
  slice2vol bench --config configs/experiments/ixi.yaml --out runs/ixi
  slice2vol bench --config configs/experiments/ixi.yaml splits.n_repeats=5 tasks=[knn,linear]
  slice2vol bench --config configs/experiments/ci.yaml encoders.0.aggregators=[mean,mil]
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_config(parser, required=True, help="experiment YAML, e.g. configs/experiments/demo.yaml")
    _common.add_out(parser, help="output folder (default runs/<name>)")
    _common.add_device(parser, config_key="device")
    _common.add_seed(parser, default=None)
    _common.add_progress(parser)
    _common.add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    from slice2vol.commands._common import command_line, overrides_of, resolve_device
    from slice2vol.config import ConfigError, resolve_config_path
    from slice2vol.eval.runner import IntegrationError, load_experiment, run_experiment

    try:
        config = resolve_config_path(args.config)  # a file, or a packaged config by name (experiments/ci)
        cfg, base = load_experiment(config, overrides_of(args))
    except ConfigError as err:
        raise ValueError(str(err)) from None
    # the config's own device stands unless --device is given (an explicit --device auto overrides a
    # config's cpu); a bad one is blamed on the key, not on a flag that was not given
    device = getattr(args, "device", None)
    cfg.device = resolve_device(cfg.device, "device") if device is None else resolve_device(device)
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / cfg.name
    _common.add_run_log(out)
    try:
        result = run_experiment(cfg, base=base, out=out, progress=_common.progress_enabled(args),
                                config_path=str(config),
                                command_line=getattr(args, "command_line", None) or command_line())
    except IntegrationError as err:
        raise ValueError(f"pipeline piece missing: {err}") from None
    paths = result["paths"]
    print(f"[bench] report: {paths['report.html']}")
    print(f"[bench] results: {paths['results.csv']} ({len(result['rows'])} rows), {paths['results.json']}")
    print(f"[bench] time: {result['timings'].get('total', 0):.1f} s")
    failed = result["results"]["cohort"]["failures"]  # manifest rows left out, and subjects that failed
    if failed:
        print(f"[bench] {len(failed)} subject(s) failed or were left out (listed in the report):", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
    # a subject a dense task could not read (its seg map off-grid, truncated, ...) is left out of that
    # task only; the other tasks scored it, so it is no cohort failure, but the run is not complete
    failed_ids = {str(line).split(":")[0] for line in failed}  # already listed above
    left_out = [e for e in result["results"].get("skipped", []) if ": subject " in str(e.get("name", ""))
                and str(e["name"]).split(": subject ", 1)[1] not in failed_ids]
    if left_out:
        print(f"[bench] {len(left_out)} subject(s) left out of a task (listed in the report):", file=sys.stderr)
        for entry in left_out:
            print(f"  {entry['name']}: {entry.get('reason', '')}", file=sys.stderr)
    if not result["rows"]:
        print("[bench] no result: every task or label was skipped (the report's 'Skipped' section says why)",
              file=sys.stderr)
    # a task asked for that gave no row at all: every set of it failed (the demo's anomaly task once did,
    # with only warnings in the log and exit 0)
    empty = [t for t in result["results"]["config"].get("tasks", []) if result["rows"]
             and not any(r.get("task") == t for r in result["rows"])]
    for task in empty:
        why = next((e["reason"] for e in result["results"].get("skipped", []) if str(e.get("name", "")).startswith(
            f"{task}:")), "see the report's 'Skipped' section")
        print(f"[bench] task {task!r} gave no result: {why}", file=sys.stderr)
    return 1 if failed or left_out or not result["rows"] or empty else 0
