"""``slice2vol demo``: the project's question end to end on the offline synthetic cohort.

Runs the benchmark experiment ``experiments/demo.yaml`` (the packaged copy of
``configs/experiments/demo.yaml``, so it works from any folder after ``pip install``): builds the
synthetic MNI152 cohort once into ``<out>/cohort``, caches the slice features of an ImageNet and a
randomly initialised 2D encoder, embeds the volumes with a pretrained native-3D encoder, scores
every set with the same subject-level splits and writes the report; then adds the cohort overview
and the demo's command line to the report. Everything already done is reused on a second run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from slice2vol.commands._common import add_config, add_device, add_out, add_overrides, add_progress

HELP = "run the whole comparison on the offline synthetic cohort (synth -> cache -> aggregate -> 3D -> probes -> report)"
DESCRIPTION = __doc__
DEFAULT_CONFIG = "experiments/demo.yaml"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_out(parser, default="runs/demo", help="output folder (report.html, results.json, stores, slice2vol.log)")
    add_config(parser, default=DEFAULT_CONFIG,
               help="experiment config: a file, or a name under the packaged configs/")
    add_device(parser)
    add_progress(parser)
    add_overrides(parser)


def cohort_overview(manifest: Path, out: Path) -> Path:
    """Writes ``<out>/figures/cohort.png`` (+ SVG): three planes of the first subjects with their labels."""
    from slice2vol.eval.plots import cohort_overview as draw

    return draw(manifest, out / "figures" / "cohort.png",
                title=f"Synthetic cohort ({manifest.parent.name}): first subjects, slices through the lesions")


def add_to_report(out: Path, figure: Path | None, command_line: str | None) -> Path | None:
    """Adds the cohort figure (first) and the command line to the run's results and re-renders the report.

    Returns the report path, or None when the run's ``results.json`` is not of the current schema
    (then the benchmark's own report stands as written).
    """
    from slice2vol.eval.report import SCHEMA, write_report

    path = out / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if results.get("schema") != SCHEMA:
        log.warning("%s: schema %r, not %r; report left as the benchmark wrote it", path, results.get("schema"), SCHEMA)
        return None
    if figure is not None:
        rel = figure.relative_to(out).as_posix()
        figures = [f for f in results.get("figures", []) if f.get("png") != rel]
        svg = figure.with_suffix(".svg")
        results["figures"] = [{"section": "cohort", "png": rel, "svg": svg.relative_to(out).as_posix()
                               if svg.exists() else None,
                               "caption": "The synthetic cohort: axial, coronal and sagittal slices of the first "
                                          "subjects (through the lesion centre where there is one), with their "
                                          "labels"}] + figures
    provenance = results.setdefault("provenance", {})
    if command_line and not provenance.get("command_line"):
        provenance["command_line"] = command_line
    return write_report(out, results)["report.html"]


def run(args: argparse.Namespace) -> int:
    from slice2vol.cli import build_parser, command_parser
    from slice2vol.commands._common import add_run_log, overrides_of, progress_enabled, resolve_device
    from slice2vol.config import resolve_config_path

    out = Path(args.out)
    add_run_log(out)
    config = resolve_config_path(args.config)
    log.info("demo: config %s, output %s", config, out)
    argv = ["bench", "--config", str(config), "--out", str(out)]
    parser = build_parser()
    bench_flags = {s for a in command_parser(parser, "bench")._actions for s in a.option_strings}
    overrides = overrides_of(args)
    device = resolve_device(args.device)
    if "--device" in bench_flags:
        argv += ["--device", device]
    elif not any(o.startswith("device=") for o in overrides):
        overrides.append(f"device={device}")
    if not progress_enabled(args):
        argv.append("--no-progress")
    bench_args = parser.parse_args(argv + overrides)
    bench_args.command_line = getattr(args, "command_line", None)
    status = int(bench_args._run(bench_args) or 0)
    manifest = out / "cohort" / "manifest.csv"
    figure = None
    if manifest.exists():
        try:
            figure = cohort_overview(manifest, out)
        except Exception as err:  # noqa: BLE001 - a figure must not cost the report
            log.warning("cohort overview failed: %s", err)
    report = add_to_report(out, figure, getattr(args, "command_line", None))
    print(f"[demo] open {report or out / 'report.html'}")
    return status
