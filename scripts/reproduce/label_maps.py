"""docs/data.md, the label-map and foreground rows: how many IXI images, segmentations and masks are refused.

Every T1 of the cohort is read by :func:`slice2vol.data.io.load_volume` three times (as stored, quantised
to 256 levels, quantised to 60 levels: an 8-bit export or a coarse DICOM conversion must not look like
a segmentation), and every DLMUSE segmentation and the binary brain mask made from it (seg > 0) once,
put in the image column. Prints how many of each were refused as a label map or mask, how many T1s
were refused for any reason, the largest foreground share of a T1, and the first messages.

Usage (~1 min on 2 CPU cores):
    python scripts/reproduce/label_maps.py
    python scripts/reproduce/label_maps.py --data /path/to/ixi-hh-2mm

Data: ``--data``, else $SLICE2VOL_IXI, else ../shared/data/ixi-hh-2mm beside the repository.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from slice2vol.data.io import VolumeConfig, VolumeError, load_volume

ROOT = Path(__file__).resolve().parents[2]


def _quantised(src: Path, levels: int, out: Path) -> Path:
    """Writes ``src`` rescaled onto ``levels`` integer values (0 .. levels-1) to ``out``."""
    img = nib.load(str(src))
    x = np.asarray(img.dataobj, dtype=np.float32)
    q = np.round((x - x.min()) / max(float(np.ptp(x)), 1e-6) * (levels - 1)).astype(np.int16)
    nib.save(nib.Nifti1Image(q, img.affine, img.header), str(out))
    return out


def _mask(src: Path, out: Path) -> Path:
    """Writes the binary mask ``src > 0`` of a segmentation to ``out``."""
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), str(out))
    return out


def _read(path: Path, cfg: VolumeConfig) -> tuple[str | None, float]:
    """(the refusal message or None, the foreground share of the grid when read)."""
    try:
        volume = load_volume(path, cfg)
    except VolumeError as err:
        return str(err), float("nan")
    return None, float(volume.mask.mean())


def _refused(path: Path, cfg: VolumeConfig) -> str | None:
    """The label-map message for ``path`` (None when read, or refused for another reason)."""
    message = _read(path, cfg)[0]
    return message if message and "label map" in message else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default = os.environ.get("SLICE2VOL_IXI", str(ROOT.parent / "shared" / "data" / "ixi-hh-2mm"))
    parser.add_argument("--data", type=Path, default=Path(default), help="the IXI cohort folder")
    args = parser.parse_args(argv)
    table = args.data / "participants.csv"
    if not table.is_file():
        print(f"error: {table}: no participants.csv (set --data or $SLICE2VOL_IXI)", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(table.open()))
    cfg = VolumeConfig()
    images = {"as stored": 0, "256 levels": 0, "60 levels": 0}
    segs = masks = other = 0
    first = first_mask = None
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            t1 = args.data / row["t1"]
            message, share = _read(t1, cfg)
            images["as stored"] += bool(message and "label map" in message)
            other += message is not None
            shares.append(share)
            for levels in (256, 60):
                q = _quantised(t1, levels, Path(tmp) / f"q{levels}.nii.gz")
                images[f"{levels} levels"] += _refused(q, cfg) is not None
            message = _refused(args.data / row["seg"], cfg)
            segs += message is not None
            first = first or message
            message = _refused(_mask(args.data / row["seg"], Path(tmp) / "mask.nii.gz"), cfg)
            masks += message is not None
            first_mask = first_mask or message
    n = len(rows)
    for name, count in images.items():
        print(f"T1 {name}: {count} of {n} refused as label maps")
    print(f"T1 as stored, refused for any reason: {other} of {n}; largest foreground share "
          f"{np.nanmax(shares):.1%} (smallest {np.nanmin(shares):.1%})")
    print(f"DLMUSE segmentations in the image column: {segs} of {n} refused")
    print(f"brain masks (seg > 0) in the image column: {masks} of {n} refused")
    for message in (first, first_mask):
        if message:
            print(f"message: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
