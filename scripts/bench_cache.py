"""Benchmark of the caching job (issues 4 and 17), all numbers measured in one process.

1. pipeline / bare forward: slices/s of ``cache_cohort`` end to end (read, slice, pack, encode,
   write, compact) divided by slices/s of ``encoder.encode`` on the same slices pre-made as tensors
   (on the device, for CUDA), same encoder object, batch size, allocator and threads. Target >= 0.95.
   The pipeline's loss is split into encoder slow-down (time inside ``encode`` against bare) and
   time outside the encoder (waiting for volumes, packing, writing).
2. ours / naive: the loop a researcher writes (nibabel, per slice a PIL image, the library's
   per-image eval transform, batch of one) vs our pipeline, slices/s; compared fairly: the same
   encoder object (channels_last when the bare run has it), ``inference_mode``, warmed up, same
   allocator and threads.
3. peak RSS of the job for a small and a large cohort (fresh processes), which should stay flat.
4. (``--profile-read``) where one reader's CPU time goes per volume (cProfile of the cohort's reads)
   and the head mask's hole filling against ``scipy.ndimage.binary_fill_holes`` on the same masks.
5. (``--read N``) read paths on a synthetic N-subject store: random per-subject reads, one bulk
   ``load_packed``, and the torch Dataset through a DataLoader worker.

Variants are interleaved (pipeline, bare, naive, then bare, naive, pipeline, ...) because this VM's
speed drifts. The process starts with :func:`slice2vol.runtime.configure_runtime` (``--allocator``,
``--threads``), as the CLI does.

Usage::

    python scripts/bench_cache.py                          # short default: 2 IXI subjects, stride 8
    python scripts/bench_cache.py --subjects 4 --stride 2 --reps 3 --rss ''
    python scripts/bench_cache.py --rss 12,48 --rss-encoder tv/mobilenet_v2 --rss-size 64
    python scripts/bench_cache.py --read 10000 --encoder none   # read paths only
    python scripts/bench_cache.py --subjects 12 --profile-read --encoder none   # a volume's read
    python scripts/bench_cache.py --device cuda --amp bf16 --batch-size auto --subjects 8 --stride 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ixi", default=os.environ.get("SLICE2VOL_IXI", str(REPO.parent / "shared" / "data" / "ixi-hh-2mm")),
                   help="IXI folder with participants.csv")
    p.add_argument("--encoder", default="timm/resnet18")
    p.add_argument("--weights", default="random", help="compute is the same for any weights")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", default="32", help="slices per forward pass, or 'auto' (pick_batch_size probe)")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--planes", default="axial,coronal,sagittal")
    p.add_argument("--workers", type=int, default=1, help="volume readers (0: read each volume when needed)")
    p.add_argument("--reader", default="auto", choices=["auto", "thread", "process"],
                   help="readers are threads or DataLoader processes (auto: threads on CPU, processes on GPU)")
    p.add_argument("--reps", type=int, default=2, help="A/B repetitions (interleaved)")
    p.add_argument("--naive-slices", type=int, default=48, help="slices timed for the naive loop")
    p.add_argument("--naive-warmup", type=int, default=4, help="untimed slices before the naive loop's clock starts")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast, CUDA only")
    p.add_argument("--allocator", default=None,
                   help="SLICE2VOL_ALLOCATOR value for this process (default: the project's, as the CLI)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the cores available)")
    p.add_argument("--rss", default="12,48", help="cohort sizes for the peak-RSS runs ('' to skip)")
    p.add_argument("--rss-encoder", default="tv/mobilenet_v2")
    p.add_argument("--rss-size", type=int, default=64)
    p.add_argument("--rss-stride", type=int, default=4)
    p.add_argument("--read", type=int, default=0,
                   help="also time reads from a synthetic store of this many subjects (e.g. 10000)")
    p.add_argument("--read-slices", type=int, default=60, help="slices per subject of the read store")
    p.add_argument("--read-dim", type=int, default=512, help="feature dim of the read store")
    p.add_argument("--profile-read", action="store_true",
                   help="profile the cohort's reads (one reader thread) and time the hole filling against scipy's")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    return args


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process, and of its largest (DataLoader worker) child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, children / 1024


def rss_child(args: argparse.Namespace) -> None:
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort

    cohort = load_manifest(Path(args.ixi) / "participants.csv")
    cohort = cohort.subset(cohort.ids[:args.rss_child])
    with tempfile.TemporaryDirectory() as tmp:
        report = cache_cohort(cohort, args.rss_encoder, Path(tmp) / "rss.h5",
                              encoder_kwargs={"img_size": args.rss_size},
                              slice_cfg=SliceConfig(planes=tuple(args.planes.split(",")), size=args.rss_size,
                                                    stride=args.rss_stride),
                              batch_size=int(args.batch_size) if args.batch_size != "auto" else 32,
                              num_workers=args.workers, reader=args.reader, progress=False)
        size = (Path(tmp) / "rss.h5").stat().st_size
    own, worker = peak_rss_mb()
    print(json.dumps({"subjects": len(report.done), "slices": report.slices, "peak_rss_mb": own,
                      "worker_peak_rss_mb": worker,
                      "seconds": report.seconds, "store_mb": size / 2**20}))


def read_bench(n_subjects: int, slices: int, dim: int) -> dict:
    """Writes a synthetic store (1 plane, n x slices x dim float16) and times the read paths."""
    import numpy as np
    import torch

    from slice2vol.cache import FeatureStore, PlaneFeatures, SliceBagDataset, SubjectFeatures

    rng = np.random.default_rng(0)
    prov = {"encoder": "bench/synthetic", "dtype": "float16"}
    out: dict = {"subjects": n_subjects, "slices": slices, "dim": dim}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "read.h5"
        store = FeatureStore(path, mode="a")
        block = rng.normal(size=(slices, dim)).astype(np.float32)
        start = time.perf_counter()
        with store.writer_lock():
            for lo in range(0, n_subjects, 1000):
                subjects = [SubjectFeatures(f"s{i:05d}", {"axial": PlaneFeatures(
                    block + i, np.arange(slices), np.zeros((slices, 3)))}) for i in range(lo, min(lo + 1000, n_subjects))]
                store.commit_subjects(subjects, prov)
            store.compact()
        out["write_s"] = time.perf_counter() - start
        out["store_mb"] = path.stat().st_size / 2**20
        reader = FeatureStore(path)
        ids = reader.subjects()
        order = [ids[i] for i in rng.permutation(len(ids))]
        start = time.perf_counter()
        for sid in order:
            reader.slice_features(sid, "axial")
        out["random_single_s"] = time.perf_counter() - start
        start = time.perf_counter()
        X, offsets = reader.load_packed(order, "axial")
        out["load_packed_s"] = time.perf_counter() - start
        assert X.shape == (n_subjects * slices, dim)
        loader = torch.utils.data.DataLoader(SliceBagDataset(reader, planes=["axial"]), batch_size=64,
                                             num_workers=1, collate_fn=lambda items: len(items))
        start = time.perf_counter()
        assert sum(loader) == n_subjects
        out["dataset_1worker_s"] = time.perf_counter() - start
    return out


def naive_loop(encoder, cohort, slice_indices: dict, size: int, limit: int, warmup: int,
               amp: str | None = None) -> tuple[int, float]:
    """The usual research loop: nibabel, per slice a PIL image, the library's eval transform, batch of 1.

    Fair to it: the same encoder object as the bare run (same weights, channels_last when that has
    it, same device, the same autocast on CUDA), ``inference_mode``, and ``warmup`` slices run before
    the clock starts.
    """
    import contextlib

    import nibabel as nib
    import numpy as np
    import torch
    from PIL import Image

    from slice2vol.data.slicing import PLANES

    key = encoder.info.key
    if key.startswith("timm/"):
        import timm.data

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder.model))
    else:
        import torchvision.transforms as T

        transform = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(),
                               T.Normalize(encoder.info.mean, encoder.info.std)])
    channels_last = bool(getattr(encoder, "_channels_last", False))
    device = encoder.device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp and device.type == "cuda" else contextlib.nullcontext())
    n = 0
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for subject in cohort.subjects:
            img = nib.as_closest_canonical(nib.load(str(next(iter(subject.images.values())))))
            data = img.get_fdata(dtype=np.float32)
            lo, hi = np.percentile(data, [0.5, 99.5])
            for plane, indices in slice_indices[subject.subject_id].items():
                for index in indices:
                    if n == warmup:
                        _sync(device)
                        start = time.perf_counter()
                    if n >= warmup + limit:
                        _sync(device)
                        return n - warmup, time.perf_counter() - start
                    arr = np.take(data, index, axis=PLANES[plane])
                    arr = np.clip((arr - lo) / (hi - lo), 0, 1)
                    pil = Image.fromarray((np.rot90(arr) * 255).astype(np.uint8)).convert("RGB")
                    x = transform(pil).unsqueeze(0).to(device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    encoder.forward_features(x)
                    n += 1
    _sync(device)
    return max(n - warmup, 0), time.perf_counter() - start


def reading_cpu_seconds(cohort, slice_cfg, repeats: int = 2) -> float:
    """CPU seconds one reader thread spends on the cohort's volumes (read, mask, normalise, slice,
    resize: what ``cache_cohort``'s readers do), one intra-op thread, best of ``repeats`` warm passes."""
    from slice2vol.data.io import VolumeConfig
    from slice2vol.extract import VolumeSlicesDataset
    from slice2vol.runtime import torch_threads

    jobs = [(s, tuple(slice_cfg.planes)) for s in cohort.subjects]
    dataset = VolumeSlicesDataset(jobs, VolumeConfig(), slice_cfg)
    best = float("inf")
    with torch_threads(1):
        dataset[0]  # warm-up: imports, first-call costs
        for _ in range(repeats):
            start = time.thread_time()
            for i in range(len(dataset)):
                dataset[i]
            best = min(best, time.thread_time() - start)
    return best


def profile_reading(cohort, slice_cfg, repeats: int = 3, top: int = 12) -> None:
    """Prints where one reader thread's CPU time goes per volume (cProfile, by own time), then times
    :func:`slice2vol.data.io.fill_holes` and ``scipy.ndimage.binary_fill_holes`` side by side (best of
    ``repeats``) on the head masks of the cohort's volumes (after the reader's normalisation)."""
    import cProfile
    import pstats

    import numpy as np
    from scipy import ndimage

    from slice2vol.data.io import VolumeConfig, fill_holes
    from slice2vol.data.manifest import load_subject
    from slice2vol.extract import VolumeSlicesDataset
    from slice2vol.runtime import torch_threads

    jobs = [(s, tuple(slice_cfg.planes)) for s in cohort.subjects]
    dataset = VolumeSlicesDataset(jobs, VolumeConfig(), slice_cfg)
    with torch_threads(1):
        dataset[0]  # imports, first-call costs
        profile = cProfile.Profile()
        profile.enable()
        for i in range(len(dataset)):
            dataset[i]
        profile.disable()
    stats = pstats.Stats(profile)
    n = len(dataset)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (file, line, name) -> (cc, nc, tt, ct, ...)
    print(f"reading, one thread, {n} volumes (cProfile, which adds its own overhead): "
          f"{1e3 * stats.total_tt / n:.1f} ms per volume; by own time:")
    for (file, line, name), (_, calls, own, _cum, _) in rows:
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        print(f"  {1e3 * own / n:6.2f} ms  {calls / n:6.1f} calls  {where}")
    # the very masks the reader fills (its foreground_mask calls io.fill_holes), recorded on one more read
    from slice2vol.data import io as volume_io

    masks = []

    def record(mask):
        masks.append(mask.copy())
        return fill_holes(mask)

    volume_io.fill_holes = record
    try:
        for subject in cohort.subjects:
            load_subject(subject, with_seg=False)
    finally:
        volume_io.fill_holes = fill_holes
    timings = {}
    for name, fill in (("slice2vol fill_holes", fill_holes), ("scipy binary_fill_holes", ndimage.binary_fill_holes)):
        best = float("inf")
        for _ in range(repeats):
            start = time.thread_time()
            for m in masks:
                fill(m)
            best = min(best, time.thread_time() - start)
        timings[name] = best / len(masks)
    same = all(np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m)) for m in masks)
    ours, theirs = timings["slice2vol fill_holes"], timings["scipy binary_fill_holes"]
    # fill_holes labels the mask's bounding box only: what share of the grid that is
    boxes = [np.prod([np.ptp(np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))) + 1
                      for ax in range(3)]) / m.size for m in masks if m.any()]
    print(f"hole filling of {len(masks)} head masks (shape {masks[0].shape}, bounding box "
          f"{min(boxes):.0%}-{max(boxes):.0%} of the grid): fill_holes {1e3 * ours:.1f} ms, "
          f"scipy binary_fill_holes {1e3 * theirs:.1f} ms per mask ({theirs / ours:.1f}x), identical: {same}")


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    from slice2vol.runtime import configure_runtime

    runtime = configure_runtime(threads=args.threads, allocator=args.allocator)
    if args.rss_child:
        rss_child(args)
        return
    if args.read:
        r = read_bench(args.read, args.read_slices, args.read_dim)
        print(f"read: {r['subjects']} subjects x {r['slices']} slices x {r['dim']} float16 "
              f"({r['store_mb']:.0f} MiB, written in {r['write_s']:.1f} s): random per-subject reads "
              f"{r['random_single_s']:.2f} s ({1e3 * r['random_single_s'] / r['subjects']:.2f} ms each), "
              f"load_packed all {r['load_packed_s']:.2f} s, SliceBagDataset 1 worker {r['dataset_1worker_s']:.2f} s",
              flush=True)
        if args.encoder == "none" and not args.profile_read:
            return
    if args.profile_read:
        from slice2vol.data.manifest import load_manifest
        from slice2vol.data.slicing import SliceConfig

        manifest = Path(args.ixi) / "participants.csv"
        if not manifest.exists():
            sys.exit(f"{manifest} not found: pass --ixi PATH")
        cohort = load_manifest(manifest)
        cohort = cohort.subset(cohort.ids[:args.subjects])
        profile_reading(cohort, SliceConfig(planes=tuple(args.planes.split(",")), size=args.size, stride=args.stride))
        if args.encoder == "none":
            return
    import numpy as np
    import torch

    from slice2vol.data.manifest import load_manifest, load_subject
    from slice2vol.data.slicing import SliceConfig, slice_volume
    from slice2vol.encoders import build_encoder
    from slice2vol.extract import cache_cohort, resolve_reader

    manifest = Path(args.ixi) / "participants.csv"
    if not manifest.exists():
        sys.exit(f"{manifest} not found: pass --ixi PATH")
    cohort = load_manifest(manifest)
    cohort = cohort.subset(cohort.ids[:args.subjects])
    slice_cfg = SliceConfig(planes=tuple(args.planes.split(",")), size=args.size, stride=args.stride)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = build_encoder(args.encoder, weights=args.weights, img_size=args.size)
    encoder = encoder.to(args.device).eval()
    # what the job does (channels_last for CNNs, BatchNorm folded, autocast on CUDA only); A, B and C
    # use this object
    encoder.optimize(amp=args.amp if encoder.device.type == "cuda" else None, fold_bn=True)
    batch_size = args.batch_size
    if batch_size == "auto":
        from slice2vol.encoders.base import pick_batch_size

        batch_size = pick_batch_size(encoder, encoder.device)

    # pre-made tensors: the very slices the job will encode, already on the device
    premade, indices = [], {}
    for subject in cohort.subjects:
        sliced = slice_volume(load_subject(subject, with_seg=False), slice_cfg)
        premade += [ps.images for ps in sliced.values()]
        indices[subject.subject_id] = {p: ps.indices for p, ps in sliced.items()}
    premade_t = torch.cat(premade).float().to(encoder.device)
    n_slices = len(premade_t)

    # minor page faults and system seconds of this (the encoding) process per run: a pipeline that
    # forks its reading worker pays copy-on-write faults on every heap page it writes afterwards
    kernel: dict[str, list[tuple[int, float]]] = {"pipeline": [], "bare": []}

    def own_usage() -> tuple[int, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_minflt, usage.ru_stime

    def bare() -> float:
        faults, system = own_usage()
        _sync(encoder.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n_slices, batch_size):
                encoder.encode(premade_t[i:i + batch_size])
        _sync(encoder.device)
        seconds = time.perf_counter() - start
        after = own_usage()
        kernel["bare"].append((after[0] - faults, after[1] - system))
        return n_slices / seconds

    # per pipeline run: inside encode, waiting for volumes, store, and the rest (packing, setup)
    encode_share, waits, writes, rests = [], [], [], []

    def pipeline(tmp: Path, rep: int) -> float:
        faults, system = own_usage()
        report = cache_cohort(cohort, encoder, tmp / f"bench{rep}.h5", slice_cfg=slice_cfg, batch_size=batch_size,
                              num_workers=args.workers, reader=args.reader, device=str(encoder.device), amp=args.amp,
                              progress=False)
        after = own_usage()
        kernel["pipeline"].append((after[0] - faults, after[1] - system))
        assert report.ok and report.slices == n_slices, report.summary()
        encode_share.append(report.encode_seconds)
        waits.append(report.wait_seconds)
        writes.append(report.store_seconds)
        rests.append(report.seconds - report.encode_seconds - report.wait_seconds - report.store_seconds)
        return report.slices / report.seconds

    def naive() -> float:
        n, seconds = naive_loop(encoder, cohort, indices, args.size, args.naive_slices, args.naive_warmup, args.amp)
        return n / seconds

    read_cpu = reading_cpu_seconds(cohort, slice_cfg)

    print(f"{args.encoder} @ {args.size}px, batch {batch_size}, {len(cohort)} IXI subjects, stride "
          f"{args.stride}, {n_slices} slices, device {encoder.device}, {torch.get_num_threads()} torch threads, "
          f"{args.workers} reader(s) ({resolve_reader(args.reader, encoder.device)}), "
          f"allocator {runtime['allocator']} {runtime.get('glibc', '')}", flush=True)
    bare()  # warm-up (oneDNN primitive cache, heap growth), also of the ragged last batch's shape
    rates: dict[str, list[float]] = {"pipeline": [], "bare": [], "naive": []}
    runs = {"pipeline": None, "bare": bare, "naive": naive}
    order = ["pipeline", "bare", "naive"]
    with tempfile.TemporaryDirectory() as tmp:
        runs["pipeline"] = lambda: pipeline(Path(tmp), len(rates["pipeline"]))
        for rep in range(args.reps):
            for name in order[rep % 3:] + order[:rep % 3]:  # rotate, so no variant always runs first
                rates[name].append(runs[name]())
            print(f"  rep {rep}: pipeline {rates['pipeline'][-1]:.2f}  bare {rates['bare'][-1]:.2f}  "
                  f"naive {rates['naive'][-1]:.2f} slices/s", flush=True)
    pipe, bare_rate, naive_rate = (float(np.median(rates[k])) for k in ("pipeline", "bare", "naive"))
    # where the pipeline's time goes: inside encode (against bare's time) and outside it
    pipe_s = n_slices / pipe
    enc_s = float(np.median(encode_share))
    # medians per part, each over the runs (so they need not add up to the pipeline's median exactly)
    wait_s, store_s, rest_s = float(np.median(waits)), float(np.median(writes)), float(np.median(rests))
    results = {"encoder": args.encoder, "size": args.size, "batch_size": batch_size, "slices": n_slices,
               "device": str(encoder.device), "threads": torch.get_num_threads(), "workers": args.workers,
               "reader": resolve_reader(args.reader, encoder.device),
               "runtime": runtime, "rates": rates, "pipeline_over_bare": pipe / bare_rate,
               "ours_over_naive": pipe / naive_rate, "pipeline_seconds": pipe_s, "pipeline_encode_seconds": enc_s,
               "pipeline_wait_seconds": wait_s, "pipeline_store_seconds": store_s, "pipeline_rest_seconds": rest_s,
               "bare_seconds": n_slices / bare_rate}
    # the same repetition's pipeline and bare ran back to back: their ratio is what the VM's drift
    # between repetitions disturbs least
    paired = [p / b for p, b in zip(rates["pipeline"], rates["bare"])]
    results["pipeline_over_bare_paired"] = paired
    print(f"pipeline / bare forward = {pipe:.2f} / {bare_rate:.2f} = {pipe / bare_rate:.3f}  (target >= 0.95); "
          f"per repetition: median {float(np.median(paired)):.3f} (" + ", ".join(f"{r:.3f}" for r in paired) + ")")
    print(f"  pipeline {pipe_s:.2f} s = inside encode {enc_s:.2f} s (bare: {n_slices / bare_rate:.2f} s) "
          f"+ outside {pipe_s - enc_s:.2f} s (waiting for volumes {wait_s:.2f} s, the first one's read included; "
          f"writing the store {store_s:.2f} s; packing batches and the rest {rest_s:.2f} s; medians of the runs)")
    # on a machine whose cores a CPU encoder keeps busy, a read takes its CPU time from the encoder:
    # bare / (bare + reads) is the ratio to expect then (higher where the encoder leaves gaps)
    bare_s = n_slices / bare_rate
    results["read_cpu_seconds"] = read_cpu
    results["ratio_if_reads_take_the_encoders_cpu"] = bare_s / (bare_s + read_cpu)
    print(f"  reading: {read_cpu / len(cohort):.3f} s CPU per volume (one thread, {read_cpu:.2f} s in all, "
          f"{read_cpu / bare_s:.1%} of the bare forward's time); if every read took its CPU time from the "
          f"encoder, the pipeline would reach bare / (bare + reads) = {bare_s / (bare_s + read_cpu):.3f}")
    for name, runs_ in kernel.items():
        results[f"{name}_minor_faults"] = [f for f, _ in runs_]
        results[f"{name}_system_seconds"] = [s for _, s in runs_]
    print("  encoding process, median per run: pipeline {:.0f} minor faults, {:.2f} s system; bare {:.0f}, {:.2f} s".format(
        *(float(np.median([run[i] for run in kernel[name]])) for name in ("pipeline", "bare") for i in (0, 1))))
    print(f"ours / naive loop       = {pipe:.2f} / {naive_rate:.2f} = {pipe / naive_rate:.2f}x")

    if args.rss:
        rss = {}
        for n in (int(v) for v in args.rss.split(",")):
            cmd = [sys.executable, __file__, "--rss-child", str(n), "--ixi", args.ixi, "--planes", args.planes,
                   "--rss-encoder", args.rss_encoder, "--rss-size", str(args.rss_size),
                   "--rss-stride", str(args.rss_stride), "--batch-size", str(batch_size),
                   "--workers", str(args.workers), "--reader", args.reader]
            cmd += ["--allocator", args.allocator] if args.allocator else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            rss[n] = json.loads(out.strip().splitlines()[-1])
            # a child's peak RSS means a reader process's only with process readers: with threads the
            # largest child is whatever forked to exec a command, counting the pages it inherited
            worker = (f"worker {rss[n]['worker_peak_rss_mb']:.0f} MiB" if results["reader"] == "process"
                      else "readers are threads of it")
            print(f"peak RSS, {n:3d} subjects ({rss[n]['slices']} slices, {args.rss_encoder} @ {args.rss_size}px, "
                  f"store {rss[n]['store_mb']:.1f} MiB): main process {rss[n]['peak_rss_mb']:.0f} MiB, "
                  f"{worker} ({rss[n]['seconds']:.1f} s)", flush=True)
        results["peak_rss"] = rss
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
