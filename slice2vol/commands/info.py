"""``slice2vol info PATH``: facts about a NIfTI file, or about every subject of a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "shape, spacing, orientation, intensities, foreground and slices per plane of a volume or cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .nii/.nii.gz file or a manifest .csv")
    parser.add_argument("--stride", type=int, default=1, help="slice stride for the slice counts")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less foreground than this fraction (default 0.05)")


def describe(volume, raw_range: tuple[float, float], stride: int, min_foreground: float) -> dict:
    """Facts of a loaded volume as a dict (also used by tests)."""
    import numpy as np

    from slice2vol.data.slicing import PLANES, _plane_view

    import torch

    facts = {
        "subject": volume.subject_id,
        "shape": volume.shape,
        "spacing_mm": tuple(round(s, 3) for s in volume.spacing),
        "orientation": "".join(volume.original_orientation) + " -> " + "".join(volume.orientation),
        "intensity_range": tuple(round(float(v), 3) for v in raw_range),
        "foreground_fraction": round(float(volume.mask.mean()), 3),
    }
    mask = torch.from_numpy(volume.mask)
    for plane in PLANES:
        fg = _plane_view(mask, plane).flatten(1).float().mean(1).numpy()
        kept = fg[::stride] >= min_foreground
        facts[f"{plane}_slices"] = f"{int(kept.sum())}/{len(fg)}"
    facts["seg_labels"] = int(np.unique(volume.seg).size - 1) if volume.seg is not None else None
    return facts


def run(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from slice2vol.data.io import VolumeConfig, VolumeError, load_volume
    from slice2vol.data.manifest import load_manifest, load_subject

    path = Path(args.path)
    cfg = VolumeConfig()
    rows, failures = [], []
    if path.suffix == ".csv":
        cohort = load_manifest(path)
        print(f"{path}: {len(cohort)} subjects, labels {cohort.label_types}")
        for subject in cohort.subjects:
            try:
                volume = load_subject(subject, cfg)
                raw = np.asarray(nib.load(str(next(iter(subject.images.values())))).dataobj)
                rows.append(describe(volume, (raw.min(), raw.max()), args.stride, args.min_foreground))
            except VolumeError as err:
                failures.append(str(err))
        failures = [str(f.message) for f in cohort.failures] + failures
    else:
        try:
            volume = load_volume(path, cfg)
        except VolumeError as err:
            print(f"error: {err}")
            return 1
        raw = np.asarray(nib.load(str(path)).dataobj)
        rows.append(describe(volume, (raw.min(), raw.max()), args.stride, args.min_foreground))
    for row in rows:
        print("\n".join(f"{k:>20}: {v}" for k, v in row.items()))
        print()
    if failures:
        print(f"{len(failures)} failed:")
        for f in failures:
            print(f"  {f}")
        return 1
    return 0
