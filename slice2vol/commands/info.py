"""``slice2vol info``: facts about a NIfTI file, every subject of a manifest, or a feature store.

Examples::

    slice2vol info scan.nii.gz                      # one volume
    slice2vol info --manifest cohort.csv            # every subject (a .csv PATH works too)
    slice2vol info feats.h5                         # a feature store (as 'slice2vol cache info')
    slice2vol info scan.nii.gz --oblique refuse     # how the caching job would treat an oblique scan

Exit status: 0 ok; 1 some subjects of a manifest could not be loaded (listed at the end); 2 the file
itself cannot be used (one line on stderr naming it and the problem), or a usage error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slice2vol.commands._common import add_manifest, add_progress, add_volume_options, progress_enabled, volume_config

HELP = "shape, spacing, orientation, obliquity, intensities, foreground and slices per plane of a volume or cohort"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH",
                        help="a .nii/.nii.gz file, a manifest .csv, or a feature store .h5")
    add_manifest(parser)
    parser.add_argument("--oblique", choices=["reslice", "snap", "refuse"], default="reslice",
                        help="oblique volumes: reslice onto the nearest RAS grid, snap to the nearest axes, "
                             "or refuse (as 'slice2vol cache --oblique')")
    parser.add_argument("--stride", type=int, default=1, help="slice stride for the slice counts")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less foreground than this fraction")
    add_volume_options(parser)
    add_progress(parser)


def describe(volume, raw_range: tuple[float, float], stride: int, min_foreground: float) -> dict:
    """Facts of a loaded volume as a dict of plain Python values (also used by tests)."""
    import numpy as np
    import torch

    from slice2vol.data.slicing import PLANES, plane_foreground

    facts = {
        "subject": volume.subject_id,
        "shape": tuple(int(n) for n in volume.shape),
        "spacing_mm": tuple(round(float(s), 3) for s in volume.spacing),
        "orientation": "".join(volume.original_orientation) + " -> " + "".join(volume.orientation),
        "obliquity": _obliquity(volume),
        # 4 significant digits, not 3 decimals: a volume of values around 1e-28 is not "(-0, 0)"
        "intensity_range": tuple(float(f"{float(v):.4g}") for v in raw_range),
        "foreground_fraction": round(float(volume.mask.mean()), 3),
    }
    mask = torch.from_numpy(volume.mask)
    for plane in PLANES:
        fg = plane_foreground(mask, plane)
        kept = fg[::stride] >= min_foreground
        facts[f"{plane}_slices"] = f"{int(kept.sum())}/{len(fg)}"
    facts["seg_labels"] = int(np.unique(volume.seg).size - 1) if volume.seg is not None else None
    return facts


def _obliquity(volume) -> str:
    deg = float(getattr(volume, "obliquity_deg", 0.0))
    action = getattr(volume, "oblique_action", "none")
    if action == "resliced":
        return f"{deg:.1f} deg (resliced onto the nearest RAS-aligned grid, shape {tuple(volume.shape)})"
    if action == "snapped":
        return f"{deg:.1f} deg (snapped to the nearest axes without reslicing: slices follow the tilted grid)"
    return f"{deg:.1f} deg"


def _raw_range(path: Path) -> tuple[float, float]:
    import numpy as np

    from slice2vol.data.io import read_nifti

    raw = np.asanyarray(read_nifti(path, check_values=False).dataobj)  # the checked (whole-stream) read
    return float(raw.min()), float(raw.max())


def _print(row: dict) -> None:
    print("\n".join(f"{k:>20}: {_plain(v)}" for k, v in row.items()))
    print()


def _plain(value) -> str:
    from slice2vol.data.io import printable_path

    if isinstance(value, tuple):
        # + 0.0: -0 (an inverted range's top) prints as 0
        return "(" + ", ".join(f"{v + 0.0:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return printable_path(value)  # a subject named after a file with a newline in its name: one table row


def run(args: argparse.Namespace) -> int:
    from slice2vol.data.io import load_volume, printable_path
    from slice2vol.data.manifest import Failure
    from slice2vol.data.manifest import load_manifest, load_subject
    from slice2vol.progress import track

    if args.path and args.manifest:
        raise ValueError(f"give a PATH ({args.path}) or --manifest ({args.manifest}), not both")
    if args.stride < 1:  # Python's own 'slice step cannot be zero' named no flag
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if not 0.0 <= args.min_foreground <= 1.0:  # a fraction (NaN fails this too); 2 reported 0 slices kept
        raise ValueError(f"--min-foreground must be a fraction from 0 to 1, got {args.min_foreground}")
    target = args.manifest or args.path
    if not target:
        raise ValueError("give a NIfTI file, a feature store, or --manifest cohort.csv")
    path = Path(target)
    cfg = volume_config(args, oblique=args.oblique)
    if path.name and (path.suffix in (".h5", ".hdf5") or path.with_name(path.name + ".parts").is_dir()):
        from slice2vol.cache import FeatureStore

        print(FeatureStore(path).summary())
        return 0
    if args.manifest or path.suffix.lower() in (".csv", ".tsv"):
        cohort = load_manifest(path)
        print(f"{path}: {len(cohort)} subjects, labels {cohort.label_types}")
        failures = [f.message for f in cohort.failures]
        for subject in track(cohort.subjects, desc="info", unit="subj", enabled=progress_enabled(args)):
            try:
                volume = load_subject(subject, cfg)
                first = next(iter(subject.images.values()))
                facts = describe(volume, _raw_range(first), args.stride, args.min_foreground)
                _print(facts)
                empty = _empty_planes(facts)
                if empty:  # the caching job fails such a subject: so does its preview
                    where = f"row {subject.row} ({subject.subject_id})" if subject.row else subject.subject_id
                    failures.append(f"{where}: {first}: {_no_slices(empty, args.min_foreground)}")
            except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
                # the manifest's row and ID first: the message names only the file that failed
                where = f"row {subject.row} ({subject.subject_id})" if subject.row else subject.subject_id
                failures.append(f"{where}: {Failure.of(subject, err).message}")
        if failures:  # part of the report, like the facts above
            print(f"{len(failures)} subject(s) failed:")
            for f in failures:
                print(f"  {f}")
            return 1
        return 0
    volume = load_volume(path, cfg)  # a VolumeError becomes one line on stderr, exit 2 (slice2vol.cli)
    facts = describe(volume, _raw_range(path), args.stride, args.min_foreground)
    _print(facts)
    empty = _empty_planes(facts)
    if empty:
        print(f"{printable_path(path)}: {_no_slices(empty, args.min_foreground)}")
        return 1
    return 0


def _empty_planes(facts: dict) -> list[str]:
    """Planes of :func:`describe`'s facts that keep no slice (``0/N``)."""
    return [k[: -len("_slices")] for k, v in facts.items() if k.endswith("_slices") and str(v).startswith("0/")]


def _no_slices(planes: list[str], min_foreground: float) -> str:
    return (f"no {'/'.join(planes)} slice has {min_foreground:.0%} foreground or more; `slice2vol cache` with "
            f"these planes would fail it (lower --min-foreground, or check the brain mask)")
