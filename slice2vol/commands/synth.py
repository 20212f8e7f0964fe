"""``slice2vol synth``: build the offline default cohort from the MNI152 template."""

from __future__ import annotations

import argparse

from slice2vol.commands._common import add_out, add_progress, add_seed

HELP = "make the synthetic MNI152-based cohort (NIfTI + manifest.csv)"
DESCRIPTION = """Builds a labelled synthetic cohort from the MNI152 template nilearn ships (no download):
NIfTI images, tissue segmentations, lesion masks and manifest.csv (labels lesion, atrophy, site).
The same --seed always gives the same cohort."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_out(parser, required=True, help="output folder (manifest.csv, images/, seg/, lesions/, slice2vol.log)")
    parser.add_argument("--n", type=int, default=32, help="number of subjects")
    add_seed(parser)
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm")
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from slice2vol.commands._common import add_run_log, progress_enabled
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.synthetic import make_cohort

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.spacing <= 0:
        raise ValueError(f"--spacing must be > 0 mm, got {args.spacing}")
    add_run_log(args.out)
    manifest = make_cohort(args.out, n_subjects=args.n, seed=args.seed, spacing=args.spacing,
                           progress=progress_enabled(args))
    cohort = load_manifest(manifest)
    table = cohort.labels()
    print(f"wrote {len(cohort)} subjects to {manifest}")
    print(f"lesion: {table['lesion'].value_counts().to_dict()}  site: {table['site'].value_counts().to_dict()}  "
          f"atrophy: {table['atrophy'].min():.2f}-{table['atrophy'].max():.2f}")
    return 0
