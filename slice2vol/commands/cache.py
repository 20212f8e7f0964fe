"""``slice2vol cache``: embed every slice of a cohort into a feature store; ``merge``/``compact``/``info``.

Examples::

    slice2vol cache --manifest cohort.csv --encoder timm/resnet18 --weights hub --out feats.h5 \\
        --planes axial,coronal --stride 2 --size 224 --batch-size 32 --workers 2
    slice2vol cache --manifest cohort.csv ... --shard 0/4          # writes feats.shard-0-of-4.h5
    slice2vol cache merge feats.h5 feats.shard-*-of-4.h5
    slice2vol cache info feats.h5
"""

from __future__ import annotations

import argparse
import sys

HELP = "cache slice features of a cohort in an HDF5 store (resumable, sharded); merge/compact/info stores"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("sub-actions: 'merge OUT IN...' joins shard stores (provenance must agree); "
                     "'compact STORE' folds committed parts into the main file; 'info STORE' describes it")
    parser.add_argument("action", nargs="*", metavar="ACTION",
                        help="empty to cache, or: merge OUT IN... | compact STORE | info STORE")
    parser.add_argument("--manifest", help="cohort CSV (subject_id, image columns, labels)")
    parser.add_argument("--encoder", help="encoder key, e.g. timm/resnet18 (see 'slice2vol encoders')")
    parser.add_argument("--weights", default="random", help="random | hub[:tag] | local checkpoint")
    parser.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="encoder option (repeatable), e.g. img_size=112 or pooling=gem")
    parser.add_argument("--out", help="store file (.h5); a shard writes OUT.shard-i-of-n.h5")
    parser.add_argument("--planes", default="axial,coronal,sagittal", help="comma-separated planes")
    parser.add_argument("--stride", type=int, default=1, help="keep every N-th slice")
    parser.add_argument("--size", type=int, default=224, help="slice side in pixels before the encoder")
    parser.add_argument("--context", type=int, default=1, help="2.5D stack depth (odd)")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less head foreground than this fraction")
    parser.add_argument("--spacing", type=float, default=None, help="resample volumes to this isotropic mm")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (packed across volumes)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes reading volumes")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast on CUDA")
    parser.add_argument("--shard", default=None, help="i/n: this job does every n-th subject from i "
                        "(default: from torchrun RANK/WORLD_SIZE or SLURM array variables)")
    parser.add_argument("--tokens", action="store_true", help="also store patch tokens (dense probes)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--commit-every", type=int, default=8,
                        help="commit completed subjects every N subjects (a kill loses at most these)")
    parser.add_argument("--no-compact", action="store_true", help="leave committed parts uncompacted")
    parser.add_argument("--allow-version-mismatch", action="store_true",
                        help="merge: accept shards made with different library versions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _encoder_kwargs(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--encoder-arg {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    from slice2vol.cache import FeatureStore, merge_stores

    action = args.action[0] if args.action else ""
    if action == "merge":
        if len(args.action) < 3:
            raise ValueError("usage: slice2vol cache merge OUT IN [IN ...]")
        counts = merge_stores(args.action[1], args.action[2:], allow_version_mismatch=args.allow_version_mismatch)
        print(f"{args.action[1]}: merged {len(args.action) - 2} store(s); subjects per plane {counts['subjects']}"
              + (f"; duplicates left out {counts['duplicates']}" if any(counts["duplicates"].values()) else ""))
        return 0
    if action in ("compact", "info"):
        if len(args.action) != 2:
            raise ValueError(f"usage: slice2vol cache {action} STORE")
        store = FeatureStore(args.action[1], mode="a" if action == "compact" else "r")
        if action == "compact":
            with store.writer_lock():
                store.clean_tmp()
                store.compact()
        print(store.summary())
        return 0
    if action:
        raise ValueError(f"unknown action {action!r}; use merge, compact or info (or none to cache)")

    missing = [name for name in ("manifest", "encoder", "out") if not getattr(args, name)]
    if missing:
        raise ValueError(f"caching needs --{', --'.join(missing)}")
    from slice2vol.data.io import VolumeConfig
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort

    planes = tuple(p.strip() for p in args.planes.split(",") if p.strip())
    slice_cfg = SliceConfig(planes=planes, stride=args.stride, min_foreground=args.min_foreground,
                            context=args.context, size=args.size)
    volume_cfg = VolumeConfig(spacing=(args.spacing,) * 3 if args.spacing else None)
    cohort = load_manifest(args.manifest)
    report = cache_cohort(
        cohort, args.encoder, args.out, weights=args.weights, encoder_kwargs=_encoder_kwargs(args.encoder_arg),
        volume_cfg=volume_cfg, slice_cfg=slice_cfg, batch_size=args.batch_size, num_workers=args.workers,
        device=args.device, shard=args.shard, save_tokens=args.tokens, progress=not args.no_progress,
        dtype=args.dtype, amp=args.amp, commit_every=args.commit_every, compact=not args.no_compact,
    )
    print(report.summary(), file=sys.stderr if report.failures else sys.stdout)
    return 0 if report.ok else 1
