"""Load + slice one volume into all three planes: time per step, warm, median of repeats.

Usage: python scripts/bench_slicing.py [--nifti FILE] [--size 224] [--repeats 5]
Default volume: the first IXI subject ($SLICE2VOL_IXI or ../shared/data/ixi-hh-2mm), else a
synthetic subject.
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
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    manifest = args.manifest
    if manifest is None:
        ixi = Path(os.environ.get("SLICE2VOL_IXI", Path(__file__).resolve().parents[2] / "shared/data/ixi-hh-2mm"))
        if (ixi / "participants.csv").exists():
            manifest = ixi / "participants.csv"
        else:
            from slice2vol.data.synthetic import make_cohort

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
