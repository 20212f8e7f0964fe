"""``slice2vol demo``: the main job end to end on the offline synthetic cohort.

Runs the benchmark experiment ``configs/experiments/demo.yaml``: builds the synthetic MNI152 cohort
(once, into ``<out>/cohort``), caches slice features, aggregates them to volume embeddings, trains the
3D baseline, scores every encoder and writes the report; then draws a slice gallery of the cohort.
Everything already done is reused on a second run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run the whole pipeline on the offline synthetic cohort (synth -> cache -> aggregate -> bench -> report)"

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--config", default=str(REPO / "configs" / "experiments" / "demo.yaml"),
                        help="experiment config run on the cohort")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. splits.n_repeats=1")


def cohort_overview(manifest: Path, out: Path) -> Path:
    """Writes ``cohort.png``: mid-slices (axial, coronal, sagittal) of up to 8 subjects with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slice2vol.data import SliceConfig, load_manifest, load_subject, slice_volume

    cohort = load_manifest(manifest)
    shown = cohort.subjects[:8]
    fig, axes = plt.subplots(3, len(shown), figsize=(2.2 * len(shown), 7), squeeze=False)
    for col, subject in enumerate(shown):
        volume = load_subject(subject)
        planes = slice_volume(volume, SliceConfig(size=None, min_foreground=0.0))
        lesion = volume.maps.get("lesion_mask")
        for row, name in enumerate(("axial", "coronal", "sagittal")):
            plane = planes[name]
            index = len(plane) // 2
            if lesion is not None and lesion.any():  # show the slice through the lesion centre
                axis = {"sagittal": 0, "coronal": 1, "axial": 2}[name]
                index = int(lesion.nonzero()[axis].mean().round())
            ax = axes[row, col]
            ax.imshow(plane.images[index, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join(f"{k}={v}" for k, v in subject.labels.items()), fontsize=7)
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle(f"{manifest.parent.name}: {len(cohort)} subjects (first {len(shown)})")
    fig.tight_layout()
    path = out / "cohort.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from slice2vol.commands import bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = bench.run(argparse.Namespace(config=args.config, out=str(out), overrides=list(args.overrides),
                                          no_progress=False))
    manifest = out / "cohort" / "manifest.csv"
    if manifest.exists():
        print(f"[demo] cohort overview: {cohort_overview(manifest, out)}")
    print(f"[demo] open {out / 'report.html'}")
    return status
