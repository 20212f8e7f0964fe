"""``slice2vol synth``: build the offline default cohort from the MNI152 template."""

from __future__ import annotations

import argparse

HELP = "make the synthetic MNI152-based cohort (NIfTI + manifest.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=32, help="number of subjects (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")


def run(args: argparse.Namespace) -> int:
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.synthetic import make_cohort

    manifest = make_cohort(args.out, n_subjects=args.n, seed=args.seed, spacing=args.spacing)
    cohort = load_manifest(manifest)
    table = cohort.labels()
    print(f"wrote {len(cohort)} subjects to {manifest}")
    print(f"lesion: {table['lesion'].value_counts().to_dict()}  site: {table['site'].value_counts().to_dict()}  "
          f"atrophy: {table['atrophy'].min():.2f}-{table['atrophy'].max():.2f}")
    return 0
