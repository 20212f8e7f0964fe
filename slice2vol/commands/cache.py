"""``slice2vol cache``: embed every slice of a cohort into a feature store; ``merge|verify|compact|info``.

Examples::

    slice2vol cache --manifest cohort.csv --encoder timm/resnet18 --weights hub --store feats.h5 \\
        --planes axial,coronal --stride 2 --size 224 --batch-size 32 --workers 2
    slice2vol cache --manifest cohort.csv ... --shard 3/8     # writes feats.shard-3-of-8.h5
    slice2vol cache merge --store feats.h5 --manifest cohort.csv   # finds feats.shard-*-of-8.h5 itself
    slice2vol cache verify --store feats.h5                   # checksums of every stored subject
    slice2vol cache compact --store feats.h5                  # fold a killed job's parts into feats.h5
    slice2vol cache info --store feats.h5

Exit status: 0 ok; 1 some subjects failed (caching: listed at the end and recorded in the store, the
others are cached; ``--allow-failures`` makes it 0 for schedulers whose next step needs success),
damaged subjects found (``verify``) or manifest subjects missing after ``merge --manifest``; 2 usage
or input error, including a store locked by another writer and incomplete shards (one line naming
the file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from slice2vol.commands._common import (
    HelpFormatter,
    add_device,
    add_manifest,
    add_progress,
    add_run_log,
    add_volume_options,
    log_to_run_files,
    progress_enabled,
    resolve_device,
    seed_type,
    volume_config,
    weights_arg,
)

HELP = "cache slice features of a cohort in an HDF5 store (resumable, sharded); merge/verify/compact/info"
DESCRIPTION = __doc__

log = logging.getLogger(__name__)


def _store_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    # positional form kept for `slice2vol cache verify STORE` / the pre-convention `cache info STORE`
    parser.add_argument("store_pos", nargs="?", metavar="STORE", help=f"{what} (same as --store)")
    parser.add_argument("--store", dest="sub_store", metavar="FILE", help=what)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", help="encoder key, e.g. timm/resnet18 (see 'slice2vol encoders')")
    parser.add_argument("--weights", type=weights_arg, default="random", help="random | hub[:tag] | local checkpoint")
    parser.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="encoder option (repeatable), e.g. img_size=112 or pooling=gem")
    add_manifest(parser)
    parser.add_argument("--store", metavar="FILE", help="store file (.h5) to write; a shard writes "
                        "STORE.shard-i-of-n.h5")
    parser.add_argument("--out", dest="out_deprecated", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--planes", default="axial,coronal,sagittal", help="comma-separated planes")
    parser.add_argument("--stride", type=int, default=1, help="keep every N-th slice")
    parser.add_argument("--size", type=int, default=224, help="slice side in pixels before the encoder")
    parser.add_argument("--context", type=int, default=1, help="2.5D stack depth (odd)")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less head foreground than this fraction")
    parser.add_argument("--spacing", type=float, default=None, help="resample volumes to this isotropic mm")
    parser.add_argument("--oblique", choices=["reslice", "snap", "refuse"], default="reslice",
                        help="oblique volumes: reslice onto the nearest RAS grid, snap to the nearest axes "
                             "without interpolation, or refuse them")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (packed across volumes)")
    parser.add_argument("--workers", type=int, default=1,
                        help="volume readers working ahead of the encoder (0: read each volume when needed)")
    parser.add_argument("--reader", choices=["auto", "thread", "process"], default="auto",
                        help="readers are threads of this process (the default on CPU: no fork, no copy of the "
                             "slices) or DataLoader processes (the default on GPU, where one reader is too slow)")
    add_volume_options(parser)
    add_device(parser)
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast on CUDA")
    parser.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                        help="keep BatchNorm layers as they are (default: folded into the convolutions before "
                             "them, same features up to float rounding, ~9%% faster ResNet-50 on CPU)")
    parser.add_argument("--shard", default=None, help="i/n: this job does every n-th subject from i "
                        "(default: from torchrun RANK/WORLD_SIZE; under SLURM pass --shard "
                        "$SLURM_ARRAY_TASK_ID/N)")
    parser.add_argument("--tokens", action="store_true", help="also store patch tokens (dense probes)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="storage dtype; float16 batches that do not fit switch a new store to float32")
    parser.add_argument("--commit-every", type=int, default=8,
                        help="commit completed subjects every N subjects (a kill loses at most these)")
    parser.add_argument("--no-compact", action="store_true", help="leave committed parts uncompacted")
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit 0 even when some subjects failed (they are listed and recorded in the "
                             "store; use it before a SLURM afterok merge step)")
    parser.add_argument("--seed", type=seed_type, default=0, help="seed of random weights")
    add_progress(parser)

    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    merge = sub.add_parser("merge", help="join shard stores into one store (refuses missing or unfinished shards)",
                           description="Joins STORE.shard-i-of-n.h5 files into STORE after checking that all n "
                                       "shards exist, finished, and agree in provenance.",
                           formatter_class=HelpFormatter)
    merge.add_argument("inputs", nargs="*", metavar="SHARD",
                       help="shard stores (default: every STORE.shard-*-of-*.h5 beside --store)")
    merge.add_argument("--store", dest="sub_store", metavar="FILE", help="merged store to write")
    add_manifest(merge, help="cohort CSV: report which of its subjects the merged store covers")
    merge.add_argument("--allow-version-mismatch", action="store_true",
                       help="accept shards made with different library versions")
    merge.add_argument("--allow-incomplete", action="store_true",
                       help="merge even when shards are missing or did not finish")
    verify = sub.add_parser("verify", help="check every stored subject against its checksum",
                            formatter_class=HelpFormatter)
    _store_arguments(verify, "feature store to verify")
    add_progress(verify)
    compact = sub.add_parser("compact", help="fold committed parts (a killed job's) into the main file",
                             formatter_class=HelpFormatter)
    _store_arguments(compact, "feature store to compact")
    info = sub.add_parser("info", help="describe a store", formatter_class=HelpFormatter)
    _store_arguments(info, "feature store to describe")


def _encoder_kwargs(items: list[str]) -> dict:
    from slice2vol.config import load_yaml  # YAML 1.2 numbers: lr=1e-3 is a float, not a string

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--encoder-arg {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = load_yaml(value)
    return out


def _sub_store(args: argparse.Namespace) -> str:
    store = args.sub_store or args.store_pos
    if not store:
        raise ValueError(f"slice2vol cache {args.action}: give the store (--store FILE)")
    if args.sub_store and args.store_pos and args.sub_store != args.store_pos:
        raise ValueError(f"slice2vol cache {args.action}: two stores given ({args.store_pos}, --store {args.sub_store})")
    return store


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action == "merge":
        return _merge(args)
    if action == "verify":
        return _verify(args)
    if action in ("compact", "info"):
        from slice2vol.cache import FeatureStore

        path = _sub_store(args)
        store = FeatureStore(path, mode="a" if action == "compact" else "r")
        if action == "compact":
            if not store.exists():
                raise FileNotFoundError(f"{path}: feature store not found")
            with store.writer_lock():
                store.clean_tmp()
                store.compact()
        print(store.summary())
        return 0
    return _cache(args)


def _cache(args: argparse.Namespace) -> int:
    store = args.store
    if args.out_deprecated:
        if store and store != args.out_deprecated:
            raise ValueError(f"--out {args.out_deprecated} and --store {store}: give only --store")
        log.warning("--out is deprecated for 'slice2vol cache'; use --store %s", args.out_deprecated)
        store = args.out_deprecated
    missing = [name for name, value in (("manifest", args.manifest), ("encoder", args.encoder), ("store", store))
               if not value]
    if missing:
        raise ValueError(f"caching needs --{', --'.join(missing)} (or an action: merge, verify, compact, info)")
    # --workers -1 read volumes in the encoder's thread and --commit-every 0 committed every subject,
    # both without a word
    for flag, value, low in (("--workers", args.workers, 0), ("--commit-every", args.commit_every, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    from slice2vol.data.manifest import load_manifest
    from slice2vol.data.slicing import SliceConfig
    from slice2vol.extract import cache_cohort, parse_shard, shard_from_env, shard_path

    shard = parse_shard(args.shard) if args.shard else None
    if shard is None and "SLURM_ARRAY_TASK_ID" in os.environ and shard_from_env() is None:
        task = os.environ["SLURM_ARRAY_TASK_ID"]
        raise ValueError(f"{store}: running as SLURM array task {task} without --shard: pass --shard "
                         f"$SLURM_ARRAY_TASK_ID/N with N the number of shards (scripts/slurm_cache.sh does), or "
                         "--shard 0/1 to cache every subject in this one task")
    from slice2vol.cache import checked_store_path

    store = checked_store_path(store)
    target = shard_path(store, *shard) if shard and shard[1] > 1 else store
    _refuse_non_store(target)  # before the log and the lock: '/dev/null' or a CSV named .h5 left both beside it
    add_run_log(target.parent, f"{target.name}.log")  # after the check: '--store .' wrote a file '.log'

    slice_cfg = SliceConfig(planes=args.planes, stride=args.stride, min_foreground=args.min_foreground,
                            context=args.context, size=args.size)
    volume_cfg = volume_config(args, spacing=(args.spacing,) * 3 if args.spacing is not None else None,
                               oblique=args.oblique)
    cohort = load_manifest(args.manifest)
    report = cache_cohort(
        cohort, args.encoder, store, weights=args.weights, encoder_kwargs=_encoder_kwargs(args.encoder_arg),
        volume_cfg=volume_cfg, slice_cfg=slice_cfg, batch_size=args.batch_size, num_workers=args.workers,
        reader=args.reader,
        device=resolve_device(args.device), shard=shard, save_tokens=args.tokens,
        progress=progress_enabled(args), dtype=args.dtype, amp=args.amp, fold_bn=args.fold_bn,
        commit_every=args.commit_every, compact=not args.no_compact, seed=args.seed,
    )
    print(report.summary(), file=sys.stderr if report.failures else sys.stdout)
    log_to_run_files(report.summary(), "slice2vol.cache")
    from slice2vol.cache import FeatureStore, StoreError

    try:
        done = FeatureStore(report.store, mode="r")  # opened once for both after-job notes
    except (StoreError, OSError):
        done = None
    if done is not None:
        if report.recomputed:
            _stale_sets(done, report.store)
        _same_scans(done, report.store, cohort)
    if report.failures and args.allow_failures:
        print(f"{report.store}: {len(report.failures)} subject(s) failed; exit status 0 because of "
              "--allow-failures", file=sys.stderr)
        return 0
    return 0 if report.ok else 1


def _refuse_non_store(path: Path) -> None:
    """An existing ``--store`` that is no regular file, or a non-empty file that is no HDF5 file."""
    import stat as stat_

    import h5py

    from slice2vol.cache import StoreCorrupt, StoreError

    try:
        st = path.stat()
    except OSError:
        return  # absent (created by the job) or unreadable (the job says why)
    if not stat_.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: not a regular file (a device, pipe or socket); a feature store is an HDF5 file")
    if st.st_size > 0 and not h5py.is_hdf5(str(path)):
        raise StoreCorrupt(f"{path}: cannot open as HDF5 (not an HDF5 file); the file is damaged or not a feature store")


def _stale_sets(store, store_path) -> None:
    """Names the aggregated volume-embedding sets that the subjects recomputed now made stale."""
    from slice2vol.cache import StaleEmbeddings, StoreError

    try:
        names = store.volume_embedding_names()
    except (StoreError, OSError):
        return
    stale = []
    for name in names:
        try:
            store.volume_embeddings(name)
        except StaleEmbeddings:
            stale.append(name)
        except (StoreError, OSError, KeyError):
            continue
    if stale:
        print(f"{store_path}: volume embeddings {', '.join(map(repr, stale))} were aggregated from features that "
              "this run recomputed or removed: run slice2vol aggregate again (until then they are refused)",
              file=sys.stderr)


def _same_scans(store, store_path, cohort) -> None:
    """Warns, one line per group, about subjects of this cohort whose features are identical in every
    plane: one scan under several IDs, which the manifest's byte comparison misses when the files'
    bytes differ. They stay in the store (the features are right); ``bench`` leaves them out."""
    from slice2vol.cache import StoreError

    try:
        groups = store.same_features()
    except (StoreError, OSError, KeyError):
        return
    images = {s.subject_id: next(iter(s.images.values()), None) for s in cohort.subjects}
    for group in groups:
        if not any(sid in images for sid in group):
            continue  # subjects of another manifest cached into the same store: not this job's news
        named = ", ".join(f"{sid!r} ({images.get(sid) or 'cached earlier'})" for sid in group)
        print(f"{store_path}: subjects {named} have identical features in every plane: one scan under "
              f"{len(group)} IDs? In subject-level splits it would sit on both sides (bench leaves such subjects "
              "out); keep one ID", file=sys.stderr)


def _merge(args: argparse.Namespace) -> int:
    from slice2vol.cache import find_shards, merge_stores

    out, inputs = args.sub_store, list(args.inputs)
    if not out:
        if len(inputs) < 2:
            raise ValueError("slice2vol cache merge: give the merged store (--store FILE) and its shards")
        log.warning("'slice2vol cache merge OUT IN...' is deprecated; use 'slice2vol cache merge --store OUT IN...'")
        out, inputs = inputs[0], inputs[1:]
    if not inputs:
        inputs = [str(p) for p in find_shards(out)]
        if inputs:
            log.info("%s: merging %d shard file(s) found beside it", out, len(inputs))
    if args.manifest and not Path(args.manifest).is_file():  # before the merge, not after writing it
        raise FileNotFoundError(f"{args.manifest}: manifest not found")
    counts = merge_stores(out, inputs, allow_version_mismatch=args.allow_version_mismatch,
                          require_complete=not args.allow_incomplete)
    print(f"{out}: merged {len(inputs)} store(s); subjects per plane {counts['subjects']}"
          + (f"; duplicates left out {counts['duplicates']}" if any(counts["duplicates"].values()) else "")
          + (f"; volume embeddings joined {counts['volume_sets']}" if counts["volume_sets"] else "")
          + (f"; not joined {sorted(counts['volume_sets_dropped'])} (see the warning)"
             if counts["volume_sets_dropped"] else "")
          + (f"; float16 features of {len(counts['promoted'])} store(s) written as float32 (the others' float16 "
             "fallback)" if counts.get("promoted") else ""))
    if not args.manifest:
        return 0
    return _coverage(out, args.manifest)


def _coverage(store_path: str, manifest: str) -> int:
    """Prints which manifest subjects the store holds in every plane; 1 when some are missing."""
    from slice2vol.cache import FeatureStore
    from slice2vol.data.manifest import load_manifest

    cohort = load_manifest(manifest)
    wanted = cohort.ids + [f.subject_id for f in cohort.failures if f.subject_id not in ("?", *cohort.ids)]
    store = FeatureStore(store_path)
    have = set(store.subjects())
    reasons = {}
    for event in store.history:  # the latest recorded failure of each subject
        for failure in event.get("failures", []):
            reasons[failure["subject_id"]] = failure["message"]
    for failure in cohort.failures:
        reasons.setdefault(failure.subject_id, failure.message)
    missing = [sid for sid in wanted if sid not in have]
    extra = sorted(have - set(wanted))
    print(f"coverage of {manifest}: {len(wanted) - len(missing)} of {len(wanted)} subject(s) complete in "
          f"every plane ({', '.join(store.planes)})" + (f"; {len(extra)} stored subject(s) not in the manifest"
                                                         if extra else ""))
    if missing:
        print(f"{len(missing)} manifest subject(s) missing:", file=sys.stderr)
        for sid in missing:
            print(f"  {sid}: {reasons.get(sid, 'not cached (no failure recorded)')}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from slice2vol.cache import FeatureStore

    path = _sub_store(args)
    store = FeatureStore(path)
    if not store.exists():
        raise FileNotFoundError(f"{path}: feature store not found")
    report = store.verify(progress=progress_enabled(args))
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
