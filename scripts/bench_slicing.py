"""Load + slice one volume into all three planes: time per step, warm, median of repeats.

Usage: python scripts/bench_slicing.py [--nifti FILE | --manifest CSV] [--size 224] [--repeats 5]
Default volume: the first subject of the IXI manifest ($SLICE2VOL_IXI or ../shared/data/ixi-hh-2mm);
without it, a synthetic MNI152 subject, and the first output line says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slice2vol.data import SliceConfig, load_manifest, load_subject, slice_volume


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--nifti", default=None, help="one NIfTI volume to time")
    source.add_argument("--manifest", default=None, help="a cohort manifest; its first subject is timed")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    manifest = args.manifest
    if args.nifti is not None:
        nifti = Path(args.nifti)
        if not nifti.is_file():
            parser.error(f"--nifti {nifti}: no such file")
        manifest = Path(tempfile.mkdtemp()) / "manifest.csv"
        manifest.write_text(f"subject_id,t1\n{nifti.name.split('.')[0]},{nifti.resolve()}\n")
    elif manifest is None:
        ixi = Path(os.environ.get("SLICE2VOL_IXI", Path(__file__).resolve().parents[2] / "shared/data/ixi-hh-2mm"))
        if (ixi / "participants.csv").exists():
            manifest = ixi / "participants.csv"
        else:
            from slice2vol.data.synthetic import make_cohort

            print(f"no IXI manifest at {ixi} (set SLICE2VOL_IXI): timing a synthetic MNI152 subject instead")
            manifest = make_cohort(tempfile.mkdtemp(), n_subjects=1, progress=False)
    subject = load_manifest(manifest).subjects[0]
    cfg = SliceConfig(size=args.size, min_foreground=0.0)
    slice_volume(load_subject(subject), cfg)  # warm-up: imports, kernels
    load_t, slice_t = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        volume = load_subject(subject)
        t1 = time.perf_counter()
        out = slice_volume(volume, cfg)
        t2 = time.perf_counter()
        load_t.append(t1 - t0)
        slice_t.append(t2 - t1)
    n = sum(len(p) for p in out.values())
    print(f"subject {subject.subject_id}: grid {volume.shape}, {n} slices over 3 planes at {args.size} px, "
          f"{torch.get_num_threads()} threads")
    print(f"load (read+RAS+normalise+mask+seg): {statistics.median(load_t):.3f} s")
    print(f"slice + resize all planes:          {statistics.median(slice_t):.3f} s")
    print(f"total:                              {statistics.median(load_t) + statistics.median(slice_t):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
